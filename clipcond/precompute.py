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
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from clipcond.inputs import Scan, caption_key, expand_inputs, scan_captions
from clipcond.pipeline import encode_shards
from clipcond.store import (
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    NULL,
    TMP_MARK,
    StoreLock,
    index_name,
    read_manifest,
    read_tensors,
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


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecomputeJob:
    """What to encode and where; the encoder is the ``TextConditioner`` passed beside it."""

    # .txt / .jsonl / .csv / .parquet / webdataset .tar, or a saved Hugging Face dataset folder; several
    # (and globs) read as one table in sorted path order
    input: Path | Sequence[Path | str]
    out: Path  # the store folder (created; grown when it holds a store of the same encoder)
    column: str | Sequence[str] = "caption"  # several: each row's caption variants (or one list column)
    id_column: str | None = None  # ids for EmbeddingStore.by_id; must be unique (tars: their __key__)
    limit: int | None = None  # encode only the first rows of the input
    batch_size: int = 128
    shard_size: int | None = None  # unique embeddings per shard; None: the store's own, else ~256 MiB
    part: tuple[int, int] | None = None  # (i, n): encode part i of n; the last part to finish publishes
    verify: bool = False  # check every stored shard's sha256 first; damaged shards are encoded again
    progress: bool = True  # tqdm bars (rank 0, terminals only)

    def __post_init__(self) -> None:
        for field, low in (("batch_size", 1), ("shard_size", 1), ("limit", 0)):
            value = getattr(self, field)
            if value is not None and value < low:
                raise ValueError(f"PrecomputeJob.{field} must be >= {low}, got {value}")
        if self.part is not None and not (len(self.part) == 2 and 0 <= self.part[0] < self.part[1]):
            raise ValueError(f"PrecomputeJob.part must be (i, n) with 0 <= i < n, got {self.part}")
        inputs = [self.input] if isinstance(self.input, str | os.PathLike) else list(self.input)
        object.__setattr__(self, "input", Path(inputs[0]) if len(inputs) == 1 else tuple(map(Path, inputs)))
        object.__setattr__(self, "out", Path(self.out))

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,) if isinstance(self.column, str) else tuple(self.column)


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


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Layout:
    """Where each unique caption of the input lives after this run (rank 0 only: never broadcast)."""

    keep: list[dict]  # the base store's shards kept, as their manifest entries
    slot_keys: torch.Tensor  # [slots, 16] uint8: each slot's caption key (zeros where no shard holds it)
    slots: torch.Tensor  # [U] int64: the slot of each unique caption
    missing: list[int]  # unique captions this run encodes (indices into scan.captions), in slot order
    dropped: list[str]  # damaged base shards left out (their captions, if still used, are encoded again)


def assign_slots(out: Path, base: dict | None, scan: Scan, checksums: bool = False,
                 kept: list[dict] | None = None) -> Layout:
    """Captions the base store holds keep their slots; the others get new slots after its last one.

    ``kept``: the base shards to keep, as rank 0 decided (other ranks must not judge the files again).
    """
    keep, dropped, slot_of = [], [], {}
    slot_keys = torch.zeros(0, 16, dtype=torch.uint8)
    if base is not None:
        slot_keys = read_tensors(out / base["index"]["file"], ["keys"])["keys"]  # [slots, 16]
        raw = slot_keys.numpy().tobytes()
        for entry in base["shards"]:
            if (entry not in kept) if kept is not None else store_problems(
                    out, {"complete": True, "shards": [entry]}, checksums=checksums):
                dropped.append(entry["file"])
                continue
            keep.append(entry)
            slot_of.update((raw[16 * slot : 16 * slot + 16], slot) for slot in range(entry["start"], entry["stop"]))
        for name in dropped:
            logger.warning("%s: damaged or missing; its captions are encoded again", out / name)
    first_new = base["slots"] if base is not None else 0
    slots, missing, new_keys = array("q"), [], []
    for u, caption in enumerate(scan.captions):
        key = caption_key(caption)
        slot = slot_of.get(key)
        if slot is None:
            slot = slot_of[key] = first_new + len(missing)
            missing.append(u)
            new_keys.append(key)
        slots.append(slot)
    if new_keys:
        fresh = torch.frombuffer(bytearray(b"".join(new_keys)), dtype=torch.uint8).view(-1, 16)
        slot_keys = torch.cat([slot_keys, fresh])
    return Layout(keep, slot_keys, torch.tensor(slots, dtype=torch.long), missing, dropped)


def store_identity(tc: TextConditioner, shard_size: int) -> dict:
    """What a store is bound to: the encoder's semantics, its weights, dtype, shards' size (not the input)."""
    return {"encoder": tc.spec.to_dict(), "fingerprint": tc.fingerprint, "dtype": str(tc.dtype).removeprefix("torch."),
            "sequence_shape": [tc.max_length, tc.sequence_dim], "pooled_dim": tc.pooled_dim, "shard_size": shard_size}


def plan_manifest(tc: TextConditioner, job: PrecomputeJob, scan: Scan, shard_size: int, base: dict | None,
                  layout: Layout) -> dict:
    """The manifest this run publishes, but for the index and the new shards' entries; ``new_shards`` lists them."""
    from clipcond import __version__

    first_slot, next_shard = (base["slots"], base["next_shard"]) if base is not None else (0, 0)
    missing = len(layout.missing)
    # Which caption goes to which shard and batch follows from these: parts and reruns agree on it.
    plan_id = _digest(base["generation"] if base else None, shard_size, scan.sha256, missing)
    new = [[next_shard + i, first_slot + a, first_slot + min(a + shard_size, missing)]
           for i, a in enumerate(range(0, missing, shard_size))]
    inputs = {"paths": [str(p) for p in expand_inputs(job.input)], "columns": list(job.columns),
              "id_column": job.id_column, "limit": job.limit, "sha256": scan.sha256}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "clipcond_version": __version__, "complete": False,
        **store_identity(tc, shard_size), "input": inputs, "has_ids": scan.ids is not None,
        "rows": len(scan.rows), "variants": scan.variants, "unique": len(scan.captions),
        "slots": first_slot + missing, "next_shard": next_shard + len(new), "num_shards": len(layout.keep) + len(new),
        "plan": plan_id, "generation": _digest(plan_id, inputs), "new_shards": new,
        "run": {"encoded": missing, "reused": len(scan.captions) - missing},  # this run's, never written
        "truncated": 0, "index": None, "null": None, "shards": list(layout.keep),
    }


def _short(value: object) -> str:
    if isinstance(value, dict):  # an encoder spec: its name and a digest of all its fields
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        return f"spec {value['name']!r} (fields {digest})"
    text = str(value)
    return text if len(text) <= 20 else text[:16] + "..."


def check_compatible(existing: dict, plan: dict, out: Path) -> None:
    """Refuse to add to a store made with other weights, spec, dtype or shard size (any input is fine)."""
    if existing.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out} is a version-{existing.get('format_version')} store (clipcond "
                         f"{existing.get('clipcond_version')}): EmbeddingStore still reads it, but it cannot grow. "
                         f"Convert it by running this precompute into a new --out, then replace {out} with it")
    # Descriptive spec fields (source, hub_repo) may change between releases, as in the fingerprint.
    old, new = ({k: v for k, v in m["encoder"].items() if k not in ("source", "hub_repo")} for m in (existing, plan))
    diffs = [f"encoder: the store has {_short(old)}, this run {_short(new)}"] if old != new else []
    diffs += [f"{key}: the store has {_short(existing.get(key))}, this run {_short(plan[key])}"
              for key in ("fingerprint", "dtype", "shard_size") if existing.get(key) != plan[key]]
    if diffs:
        raise ValueError(f"{out} holds a store made differently; refusing to add to it:\n  " + "\n  ".join(diffs)
                         + f"\nwrite to another --out, or delete {out} to start over")


def _refuse_foreign(out: Path) -> None:
    """A folder without a manifest must be empty, or what a killed run leaves: index, null, temporaries."""
    if (out / MANIFEST).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
    if foreign:
        raise ValueError(f"{out} is not empty and holds no {MANIFEST} (it has {foreign[:5]}): not a clipcond "
                         "store; write to a new or empty --out")


def _ours(name: str) -> bool:
    return (name in (INDEX, NULL, MANIFEST, StoreLock.NAME) or TMP_MARK in name
            or (name.startswith(("shard-", "index-")) and name.endswith((".safetensors", ".json"))))


def _done_shards(out: Path, plan: dict, existing: dict | None) -> dict[int, dict]:
    """New shards of this plan whose file is whole (its size as recorded); the rest are encoded (again)."""
    expected = {shard_name(k): (k, start, stop) for k, start, stop in plan["new_shards"]}
    entries = list((existing or {}).get("shards", []))
    for sidecar in sorted(out.glob("shard-*.json")):
        try:
            entries.append(json.loads(sidecar.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # never half-written (atomic), but re-encoding is always safe
    done = {}
    for entry in entries:
        k, *rows = expected.get(entry.get("file"), (None, None, None))
        path = out / str(entry.get("file"))
        if (k is not None and [entry.get("start"), entry.get("stop")] == rows and entry.get("plan") == plan["plan"]
                and path.is_file() and path.stat().st_size == entry.get("bytes")):
            done[k] = entry
    return done


def _clean(out: Path, plan: dict, kept: list[dict]) -> None:
    """Remove temporaries, damaged shards, and shards and sidecars of other plans (a killed run's)."""
    keep = {e["file"] for e in kept} | {shard_name(k) for k, _, _ in plan["new_shards"]}
    keep |= {n.replace(".safetensors", ".json") for n in keep}
    for path in out.iterdir():
        if TMP_MARK in path.name or (path.name.startswith("shard-") and path.name not in keep):
            path.unlink(missing_ok=True)


def prepare(tc: TextConditioner, job: PrecomputeJob, scan: Scan, lock: StoreLock) -> tuple[dict, Layout]:
    """Lock, then check or start the store: ``(plan, layout)``; a new store gets an incomplete manifest."""
    out = job.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the store is a folder")
    out.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(out)  # before a lock file lands in it
    lock.acquire(wait=job.part is not None)
    existing = read_manifest(out) if (out / MANIFEST).is_file() else None  # no other run writes it now
    shard_size = job.shard_size or (existing or {}).get("shard_size") or default_shard_size(tc, job.batch_size)
    if existing is not None:
        check_compatible(existing, store_identity(tc, shard_size), out)
    base = existing if existing and existing["complete"] else None  # incremental runs never unmark a store
    layout = assign_slots(out, base, scan, checksums=job.verify)
    plan = plan_manifest(tc, job, scan, shard_size, base, layout)
    null_entry = (base or existing or {}).get("null")
    if not null_entry or store_problems(out, {"complete": True, "shards": [], "null": null_entry}):
        # The null depends on the encoder alone: rewritten, it is the same bytes the manifest records.
        null = tc.null(1)
        null_entry = write_tensors(out, NULL, {"sequence": null.sequence.cpu(), "pooled": null.pooled.cpu()})
    plan["null"] = null_entry
    if base is not None and base["input"] == plan["input"] and not layout.missing and not layout.dropped:
        logger.info("%s is complete already: nothing to encode", out)
        return {**base, "new_shards": [], "run": plan["run"]}, layout
    _clean(out, plan, layout.keep)
    if base is None:  # a new store: refused as incomplete until its last shard is in
        done = _done_shards(out, plan, existing)
        write_json(out / MANIFEST, _written({**plan, "shards": [done[k] for k in sorted(done)]}))
    return plan, layout


def _written(plan: dict) -> dict:
    """The manifest as written: without what only this run needs to know."""
    return {k: v for k, v in plan.items() if k not in ("new_shards", "run")}


def finalize(out: Path, plan: dict, layout: Layout, scan: Scan, *, parts: bool = False) -> dict | None:
    """Every new shard is written: publish the index, then the manifest (the new version, atomically).

    With parts, the last part to finish does it; an earlier one returns None.
    """
    existing = read_manifest(out) if (out / MANIFEST).is_file() else None
    if existing is not None and existing["complete"] and existing.get("generation") == plan["generation"]:
        return {**existing, "run": plan["run"]}  # another part published this very version
    done = _done_shards(out, plan, existing)
    missing = [k for k, _, _ in plan["new_shards"] if k not in done]
    if missing:
        if parts:
            return None
        raise RuntimeError(f"{out}: {len(missing)} shards were written by no rank (first: {missing[:10]})")
    index = {"rows": layout.slots[scan.rows], "keys": layout.slot_keys, **(scan.ids or {})}  # rows [N, k] slots
    manifest = _written(plan)
    manifest["shards"] = [*layout.keep, *(done[k] for k, _, _ in plan["new_shards"])]
    manifest["index"] = write_tensors(out, index_name(plan["generation"]), index)
    manifest.update(complete=True, truncated=sum(entry.get("truncated", 0) for entry in manifest["shards"]))
    write_json(out / MANIFEST, manifest)
    for sidecar in out.glob("shard-*.json"):
        sidecar.unlink(missing_ok=True)
    if manifest["truncated"]:
        logger.warning("%d unique captions were longer than %d tokens and were truncated, as diffusers does",
                       manifest["truncated"], manifest["sequence_shape"][0])
    return {**manifest, "run": plan["run"]}


# --- the job ----------------------------------------------------------------------------
def precompute(tc: TextConditioner, job: PrecomputeJob) -> dict:
    """Encode ``job.input`` with ``tc`` into the store ``job.out``, adding to it; returns its manifest.

    Captions the store holds already are not encoded again (the returned ``manifest["run"]`` counts
    ``encoded`` and ``reused``; it is not written to disk).
    Under torchrun every rank calls this with its own ``tc`` (see ``rank_device``); all ranks read
    the input (it must be the same everywhere) and ``job.out`` must be one folder that all ranks see.
    With ``job.part = (i, n)`` this process encodes part i of n and the last part to finish publishes
    the store (its manifest says ``complete`` then; earlier parts return it incomplete).
    """
    if tc.spec.long_prompts != "truncate":
        raise ValueError(f"precompute stores [{tc.max_length}, D] sequences; encoder {tc.spec.name!r} has "
                         f"long_prompts={tc.spec.long_prompts!r}: load it with long_prompts='truncate'")
    ranks, lock = Ranks.from_env(), StoreLock(job.out)  # rank 0 holds the lock for the whole job
    if job.part is not None and ranks.world > 1:
        raise ValueError("--part splits a job across independent processes; under torchrun the ranks split it")
    part, parts = job.part or (ranks.rank, ranks.world)
    with process_group(ranks), closing(lock):
        main = ranks.rank == 0
        scan = scan_captions(job.input, column=job.columns, id_column=job.id_column, limit=job.limit,
                             progress=job.progress and main)
        ranks.check_same((scan.sha256, tc.fingerprint, str(tc.dtype)), "input sha256, weights fingerprint, dtype")
        layout: list[Layout] = []  # rank 0's, filled by prepare (too big to broadcast)
        plan = ranks.on_main(lambda: _remember(prepare(tc, job, scan, lock), layout))
        if job.part is not None:
            lock.close()  # parts encode side by side; the lock is taken again to publish
        done = _done_shards(job.out, plan, None) if plan["new_shards"] else {}
        todo = [s for i, s in enumerate(plan["new_shards"]) if i % parts == part and s[0] not in done]
        logger.info("%s %d/%d: %d shards to encode (%d of %d new shards done before); %d new captions, %d found "
                    "in the store", "part" if job.part else "rank", part, parts, len(todo), len(done),
                    len(plan["new_shards"]), plan["run"]["encoded"], plan["run"]["reused"])
        if todo:
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": plan["encoder"]["name"],
                    "fingerprint": plan["fingerprint"], "dtype": plan["dtype"], "plan": plan["plan"]}
            captions = SlotCaptions(scan.captions, layout[0].missing if layout else _missing(scan, plan, job),
                                    plan["slots"] - plan["run"]["encoded"])
            stats = encode_shards(tc, captions, [tuple(s) for s in todo], job.out, batch_size=job.batch_size,
                                  meta=meta, progress=job.progress and main)
            logger.info("%s %d: %s", "part" if job.part else "rank", part, stats.summary(),
                        extra={"pipeline_stats": stats})
        ranks.barrier()
        if not plan["new_shards"] and plan["complete"]:
            return {k: v for k, v in plan.items() if k != "new_shards"}
        if job.part is not None:
            lock.acquire(wait=True)
        manifest = ranks.on_main(lambda: finalize(job.out, plan, layout[0], scan, parts=job.part is not None))
        if manifest is None:
            logger.info("part %d/%d done; the store is published by the last part to finish", part, parts)
            return {**read_manifest(job.out), "run": {**plan["run"], "waiting": True}}
        return manifest


def _remember(result: tuple[dict, Layout], box: list[Layout]) -> dict:
    plan, layout = result
    box.append(layout)
    return plan


def _missing(scan: Scan, plan: dict, job: PrecomputeJob) -> list[int]:
    """Ranks other than 0: the unique captions rank 0 found missing, from the same scan and store."""
    base = read_manifest(job.out) if plan["shards"] else None
    return assign_slots(job.out, base if base and base["complete"] else None, scan, kept=plan["shards"]).missing


class SlotCaptions(Sequence[str]):
    """Captions by slot for the pipeline: slot ``first + i`` holds ``captions[missing[i]]``."""

    def __init__(self, captions: list[str], missing: list[int], first: int) -> None:
        self.captions, self.missing, self.first = captions, missing, first

    def __len__(self) -> int:
        return self.first + len(self.missing)

    def __getitem__(self, i: int | slice) -> str | list[str]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self.captions[u] for u in self.missing[i.start - self.first : i.stop - self.first]]
        return self.captions[self.missing[i - self.first]]
