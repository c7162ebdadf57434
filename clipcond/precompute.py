"""``clipcond precompute``: a caption dataset encoded once into an ``EmbeddingStore`` folder.

Replaces the precompute loops of diffusers' ``train_text_to_image_sdxl.py`` (``encode_prompt``
over ``datasets.map``) and kohya sd-scripts' ``--cache_text_encoder_outputs``, and adds:

- deduplication: identical captions are encoded and stored once (first pass, clipcond/inputs.py);
- crash safety: every file is written atomically (clipcond/store.py), a shard's manifest entry
  (a ``shard-XXXXX.json`` sidecar) before the shard itself, so a run killed at any point and rerun
  with the same command keeps the whole shards, encodes the rest, and ends with every row once;
  a store of other weights, spec, dtype or input is refused;
- scale-out: under ``torchrun`` rank r encodes shards k = r (mod world size) and writes its own
  files; rank 0 writes the index and the null before, and the manifest after (gloo barriers and
  small broadcasts; no tensor crosses ranks, so CPU ``gloo`` is enough on GPUs too);
- overlap: a thread tokenizes ahead of the encoder and a thread streams the rows to disk behind
  it (clipcond/pipeline.py); the run logs how long the device sat idle waiting for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch.distributed as dist

from clipcond.inputs import Scan, scan_captions
from clipcond.pipeline import encode_shards
from clipcond.store import (
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    NULL,
    TMP_MARK,
    StoreLock,
    read_manifest,
    shard_name,
    store_problems,
    write_json,
    write_tensors,
)

if TYPE_CHECKING:
    from clipcond.conditioner import TextConditioner

logger = logging.getLogger(__name__)
T = TypeVar("T")

TARGET_SHARD_BYTES = 256 * 2**20  # default shard size: few files, yet one shard re-encodes in seconds
# Ranks wait at barriers for the slowest one; gloo's 30-minute default is shorter than a big job.
BARRIER_TIMEOUT = timedelta(hours=48)
IDENTITY = ("format_version", "encoder", "fingerprint", "dtype", "rows", "unique", "shard_size")


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecomputeJob:
    """What to encode and where; the encoder is the ``TextConditioner`` passed beside it."""

    input: Path  # .txt / .jsonl / .csv / .parquet, or a saved Hugging Face dataset folder
    out: Path  # the store folder (created; resumed when it holds a store of the same job)
    column: str = "caption"
    id_column: str | None = None  # ids for EmbeddingStore.by_id; must be unique
    limit: int | None = None  # encode only the first rows of the input
    batch_size: int = 128
    shard_size: int | None = None  # unique embeddings per shard; None: the store's own, else ~256 MiB
    progress: bool = True  # tqdm bars (rank 0, terminals only)

    def __post_init__(self) -> None:
        for field, low in (("batch_size", 1), ("shard_size", 1), ("limit", 0)):
            value = getattr(self, field)
            if value is not None and value < low:
                raise ValueError(f"PrecomputeJob.{field} must be >= {low}, got {value}")
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "out", Path(self.out))


# --- ranks ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK; one process without them)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        try:
            rank, world, local = (int(os.environ.get(k, d)) for k, d in
                                  (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        except ValueError as err:
            raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({err})") from err
        if not 0 <= rank < world:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
        return cls(rank, world, local)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def check_same(self, value: object, what: str) -> None:
        """Every rank must hold the same ``value`` (e.g. the same input read, the same weights)."""
        if self.world > 1:
            values: list[object] = [None] * self.world
            dist.all_gather_object(values, value)
            if any(v != values[0] for v in values):
                raise ValueError(f"ranks disagree on {what}: {values}; every rank must read the same input "
                                 "with the same weights and dtype")

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank gets its result, or fails with its error."""
        if self.world == 1:
            return fn()
        box: list[object] = [None]
        if self.rank == 0:
            try:
                box = [(True, fn())]
            except Exception as err:
                dist.broadcast_object_list([(False, f"{type(err).__name__}: {err}")], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise ValueError(f"rank 0 failed: {value}")
        return value


@contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """A gloo process group for the job's barriers, unless one process or one exists already."""
    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """``cuda`` under torchrun means this rank's GPU, ``cuda:LOCAL_RANK``; an explicit index is kept."""
    ranks = Ranks.from_env()
    if ranks.world > 1 and device != "cpu" and ":" not in device:
        return f"{device}:{ranks.local_rank}"
    return device


# --- plan, resume, finish (rank 0) -----------------------------------------------------
def default_shard_size(tc: TextConditioner, batch_size: int) -> int:
    row_bytes = (tc.max_length * tc.sequence_dim + tc.pooled_dim) * tc.dtype.itemsize
    rows = max(1, TARGET_SHARD_BYTES // row_bytes)
    return rows - rows % batch_size if rows >= batch_size else rows  # whole batches: no short batch per shard


def plan_manifest(tc: TextConditioner, job: PrecomputeJob, scan: Scan, shard_size: int) -> dict:
    from clipcond import __version__

    unique = len(scan.captions)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "clipcond_version": __version__, "complete": False,
        "encoder": tc.spec.to_dict(),  # as read back: tuples are lists
        "fingerprint": tc.fingerprint,
        "dtype": str(tc.dtype).removeprefix("torch."),
        "sequence_shape": [tc.max_length, tc.sequence_dim], "pooled_dim": tc.pooled_dim,
        "input": {"path": str(job.input), "column": job.column, "id_column": job.id_column, "limit": job.limit,
                  "sha256": scan.sha256},
        "rows": len(scan.rows), "unique": unique, "shard_size": shard_size, "num_shards": -(-unique // shard_size),
        "truncated": 0, "index": None, "null": None, "shards": [],
    }


def _identity(manifest: dict) -> dict:
    identity = {**{k: manifest[k] for k in IDENTITY}, "input sha256": manifest["input"]["sha256"]}
    # As the fingerprint: descriptive spec fields (source, hub_repo) may change between releases.
    identity["encoder"] = {k: v for k, v in identity["encoder"].items() if k not in ("source", "hub_repo")}
    return identity


def _short(value: object) -> str:
    if isinstance(value, dict):  # an encoder spec: its name and a digest of all its fields
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        return f"spec {value['name']!r} (fields {digest})"
    text = str(value)
    return text if len(text) <= 20 else text[:16] + "..."


def check_compatible(existing: dict, plan: dict, out: Path) -> None:
    """Refuse to resume a store made with other weights, spec, dtype, input or shard size."""
    old, new = _identity(existing), _identity(plan)
    diffs = [f"{key}: the store has {_short(old.get(key))}, this run {_short(new[key])}"
             for key in new if old.get(key) != new[key]]
    if diffs:
        raise ValueError(f"{out} holds a store made differently; refusing to add to it:\n  " + "\n  ".join(diffs)
                         + f"\nwrite to another --out, or delete {out} to start over")


def _refuse_foreign(out: Path) -> None:
    """A folder without a manifest must be empty, or what a killed run leaves: index, null, temporaries."""
    if (out / MANIFEST).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in (INDEX, NULL, StoreLock.NAME) and TMP_MARK not in p.name)
    if foreign:
        raise ValueError(f"{out} is not empty and holds no {MANIFEST} (it has {foreign[:5]}): not a clipcond "
                         "store; write to a new or empty --out")


def _shard_rows(plan: dict, k: int) -> tuple[int, int]:
    size = plan["shard_size"]
    return k * size, min((k + 1) * size, plan["unique"])


def _done_shards(out: Path, plan: dict, existing: dict | None) -> dict[int, dict]:
    """Shards whose file is whole (its size as recorded); the rest are encoded (again)."""
    expected = {shard_name(k): k for k in range(plan["num_shards"])}
    entries = list((existing or {}).get("shards", []))
    for sidecar in sorted(out.glob("shard-*.json")):
        try:
            entries.append(json.loads(sidecar.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # never half-written (atomic), but re-encoding is always safe
    done = {}
    for entry in entries:
        k = expected.get(entry.get("file"))
        path = out / str(entry.get("file"))
        if (k is not None and (entry.get("start"), entry.get("stop")) == _shard_rows(plan, k)
                and path.is_file() and path.stat().st_size == entry.get("bytes")):
            done[k] = entry
    return done


def prepare(tc: TextConditioner, job: PrecomputeJob, scan: Scan, lock: StoreLock) -> tuple[dict, dict[int, dict]]:
    """Lock, then check or start the store: ``(plan, shards already done)``; writes the index, null and manifest."""
    out = job.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the store is a folder")
    out.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(out)  # before a lock file lands in it
    lock.acquire()
    existing = read_manifest(out) if (out / MANIFEST).is_file() else None  # no other run writes it now
    shard_size = job.shard_size or (existing or {}).get("shard_size") or default_shard_size(tc, job.batch_size)
    plan = plan_manifest(tc, job, scan, shard_size)
    if existing is not None:
        check_compatible(existing, plan, out)
    done = _done_shards(out, plan, existing)
    if existing and existing["complete"] and len(done) == plan["num_shards"] and not store_problems(out, existing):
        logger.info("%s is complete already: nothing to encode", out)
        return existing, done
    for tmp in out.glob(f".*{TMP_MARK}*"):
        tmp.unlink(missing_ok=True)  # left by a killed run; one run per store at a time
    if existing and existing["complete"]:
        # Repairing a complete store: it stops being one before its index and null are rewritten,
        # so that a run killed in between is not taken for complete with stale checksums.
        write_json(out / MANIFEST, {**existing, "complete": False})
    plan["index"] = write_tensors(out, INDEX, scan.index_tensors())
    null = tc.null(1)
    plan["null"] = write_tensors(out, NULL, {"sequence": null.sequence.cpu(), "pooled": null.pooled.cpu()})
    plan["shards"] = [done[k] for k in sorted(done)]
    write_json(out / MANIFEST, plan)
    return plan, done


def finalize(out: Path, plan: dict) -> dict:
    """All ranks are done: record every shard and ``complete``, then drop the sidecars."""
    done = _done_shards(out, plan, plan)
    missing = [k for k in range(plan["num_shards"]) if k not in done]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} shards were written by no rank (first: {missing[:10]})")
    manifest = {**plan, "complete": True, "shards": [done[k] for k in range(plan["num_shards"])]}
    manifest["truncated"] = sum(entry.get("truncated", 0) for entry in manifest["shards"])
    write_json(out / MANIFEST, manifest)
    for sidecar in out.glob("shard-*.json"):
        sidecar.unlink(missing_ok=True)
    if manifest["truncated"]:
        logger.warning("%d unique captions were longer than %d tokens and were truncated, as diffusers does",
                       manifest["truncated"], manifest["sequence_shape"][0])
    return manifest


# --- the job ----------------------------------------------------------------------------
def precompute(tc: TextConditioner, job: PrecomputeJob) -> dict:
    """Encode ``job.input`` with ``tc`` into the store ``job.out``, resuming it; returns its manifest.

    Under torchrun every rank calls this with its own ``tc`` (see ``rank_device``); all ranks read
    the input (it must be the same everywhere) and ``job.out`` must be one folder that all ranks see.
    """
    if tc.spec.long_prompts != "truncate":
        raise ValueError(f"precompute stores [{tc.max_length}, D] sequences; encoder {tc.spec.name!r} has "
                         f"long_prompts={tc.spec.long_prompts!r}: load it with long_prompts='truncate'")
    ranks, lock = Ranks.from_env(), StoreLock(job.out)  # rank 0 holds the lock for the whole job
    with process_group(ranks), closing(lock):
        main = ranks.rank == 0
        scan = scan_captions(job.input, column=job.column, id_column=job.id_column, limit=job.limit,
                             progress=job.progress and main)
        ranks.check_same((scan.sha256, tc.fingerprint, str(tc.dtype)), "input sha256, weights fingerprint, dtype")
        plan, done = ranks.on_main(lambda: prepare(tc, job, scan, lock))
        todo = [k for k in range(plan["num_shards"]) if k % ranks.world == ranks.rank and k not in done]
        logger.info("rank %d/%d: %d shards to encode (%d of %d done before)", ranks.rank, ranks.world, len(todo),
                    len(done), plan["num_shards"])
        if todo:
            shards = [(k, *_shard_rows(plan, k)) for k in todo]
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": plan["encoder"]["name"],
                    "fingerprint": plan["fingerprint"], "dtype": plan["dtype"],
                    "input_sha256": plan["input"]["sha256"]}
            stats = encode_shards(tc, scan.captions, shards, job.out, batch_size=job.batch_size, meta=meta,
                                  progress=job.progress and main)
            logger.info("rank %d: %s", ranks.rank, stats.summary(), extra={"pipeline_stats": stats})
        ranks.barrier()
        return ranks.on_main(lambda: finalize(job.out, plan))
