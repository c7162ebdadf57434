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
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from clipcond.files import file_chunks, write_streamed
from clipcond.inputs import expand_inputs
from clipcond.pipeline import encode_shards
from clipcond.scan import CHUNK, CaptionTexts, Scan, remove_stale, scan_captions
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
    base_keys: np.ndarray  # [base slots, 16] uint8: their caption keys (new slots': scan.keys[missing])
    slots: np.ndarray  # [U] int64: the slot of each unique caption
    missing: np.ndarray  # [M] int64: unique captions this run encodes (in slot order: first_new + i)
    dropped: list[str]  # damaged base shards left out (their captions, if still used, are encoded again)


def assign_slots(out: Path, base: dict | None, scan: Scan, checksums: bool = False) -> Layout:
    """Captions the base store holds keep their slots; the others get new slots after its last one."""
    keep, dropped = [], []
    slot_keys = np.zeros((0, 16), dtype=np.uint8)
    if base is not None:
        slot_keys = read_tensors(out / base["index"]["file"], ["keys"])["keys"].numpy()  # [slots, 16]
        for entry in base["shards"]:
            if store_problems(out, {"complete": True, "shards": [entry]}, checksums=checksums):
                logger.warning("%s: damaged or missing; its captions are encoded again", out / entry["file"])
                dropped.append(entry["file"])
            else:
                keep.append(entry)
    held = np.concatenate([np.arange(e["start"], e["stop"]) for e in keep] or [np.zeros(0, np.int64)])  # [H]
    found = find_keys(slot_keys[held], scan.keys)  # [U]: index into held, -1 where no kept shard holds it
    slots = np.full(scan.unique, -1, dtype=np.int64)
    slots[found >= 0] = held[found[found >= 0]]
    missing = np.flatnonzero(found < 0)  # [M], ascending: new slots in order of first appearance
    del found
    first_new = base["slots"] if base is not None else 0
    slots[missing] = np.arange(first_new, first_new + len(missing))
    return Layout(keep, slot_keys, slots, missing, dropped)


def find_keys(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[len(keys)] int64: the row of ``table`` [T, 16] holding each of ``keys`` [K, 16], or -1 (rows unique)."""
    found = np.full(len(keys), -1, dtype=np.int64)
    if not len(table) or not len(keys):
        return found
    words, wanted = table.view(np.uint64), keys.view(np.uint64)  # [T, 2], [K, 2]
    order = np.argsort(words[:, 0])
    heads = words[order, 0]  # [T] sorted: the first 8 bytes of each key
    for a in range(0, len(keys), CHUNK):
        head = wanted[a : a + CHUNK, 0]
        pos = np.searchsorted(heads, head)  # first table key with this head, if any
        for step in range(len(table)):  # keys sharing their first 8 bytes (all but never): look further
            at = np.minimum(pos + step, len(table) - 1)
            same_head = (pos + step < len(table)) & (heads[at] == head)
            hit = same_head & (words[order[at], 1] == wanted[a : a + CHUNK, 1]) & (found[a : a + CHUNK] < 0)
            found[a : a + CHUNK][hit] = order[at][hit]
            if not same_head.any():
                break
    return found


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
        **store_identity(tc, shard_size), "input": inputs, "has_ids": scan.has_ids,
        "rows": len(scan.rows), "variants": scan.variants, "unique": scan.unique,
        "slots": first_slot + missing, "next_shard": next_shard + len(new), "num_shards": len(layout.keep) + len(new),
        "plan": plan_id, "generation": _digest(plan_id, inputs), "new_shards": new,
        "run": {"encoded": missing, "reused": scan.unique - missing},  # this run's, never written
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


def _clean(out: Path, plan: dict, kept: list[dict], *, temporaries: bool = True) -> None:
    """Remove damaged shards, shards and sidecars of other plans (a killed run's), killed runs' scan folders,
    and (``temporaries``: no part of this plan may be writing now) half-written files."""
    keep = {e["file"] for e in kept} | {shard_name(k) for k, _, _ in plan["new_shards"]}
    keep |= {n.replace(".safetensors", ".json") for n in keep}
    remove_stale(out)
    for path in out.iterdir():
        if path.is_file() and ((temporaries and TMP_MARK in path.name)
                               or (path.name.startswith("shard-") and path.name not in keep)):
            path.unlink(missing_ok=True)


def open_out(job: PrecomputeJob) -> None:
    """The store folder, made if need be; one holding anything but a store is refused."""
    if job.out.exists() and not job.out.is_dir():
        raise ValueError(f"--out {job.out} is a file; the store is a folder")
    job.out.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(job.out)  # before a lock file or a scan lands in it


def prepare(tc: TextConditioner, job: PrecomputeJob, scan: Scan, lock: StoreLock) -> tuple[dict, Layout]:
    """Lock, then check or start the store: ``(plan, layout)``; a new store gets an incomplete manifest."""
    out = job.out
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
    if base is not None and base["input"] == plan["input"] and not len(layout.missing) and not layout.dropped:
        logger.info("%s is complete already: nothing to encode", out)
        return {**base, "new_shards": [], "run": plan["run"]}, layout
    _clean(out, plan, layout.keep, temporaries=job.part is None)
    if base is None:  # a new store: refused as incomplete until its last shard is in
        done = _done_shards(out, plan, existing)
        write_json(out / MANIFEST, _written({**plan, "shards": [done[k] for k in sorted(done)]}))
    # The captions to encode, by slot, for the other ranks: spans of the scan's texts (in out, seen by all).
    scan.spans[layout.missing].tofile(scan.folder.file(TODO))
    plan["scan"] = scan.folder.path.name
    return plan, layout


TODO = "todo"  # in the scan folder: [M, 2] int64 spans of the captions this run encodes, in slot order


def _written(plan: dict) -> dict:
    """The manifest as written: without what only this run needs to know."""
    return {k: v for k, v in plan.items() if k not in ("new_shards", "run", "scan")}


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
    manifest = _written(plan)
    manifest["shards"] = [*layout.keep, *(done[k] for k, _, _ in plan["new_shards"])]
    manifest["index"] = write_index(out, index_name(plan["generation"]), layout, scan)
    manifest.update(complete=True, truncated=sum(entry.get("truncated", 0) for entry in manifest["shards"]))
    write_json(out / MANIFEST, manifest)
    for path in out.iterdir():  # sidecars, and half-written files of killed parts (all parts are done)
        if path.is_file() and (TMP_MARK in path.name or (path.name.startswith("shard-") and path.suffix == ".json")):
            path.unlink(missing_ok=True)
    if manifest["truncated"]:
        logger.warning("%d unique captions were longer than %d tokens and were truncated, as diffusers does",
                       manifest["truncated"], manifest["sequence_shape"][0])
    return {**manifest, "run": plan["run"]}


def write_index(out: Path, name: str, layout: Layout, scan: Scan) -> dict:
    """The index: ``rows`` [N, k] slots, ``keys`` [slots, 16], the ids; streamed, never held twice."""
    flat = scan.rows.reshape(-1)

    def slot_rows() -> Iterator[np.ndarray]:
        for a in range(0, len(flat), CHUNK):
            yield layout.slots[flat[a : a + CHUNK]]

    def slot_keys() -> Iterator[np.ndarray]:
        yield layout.base_keys
        for a in range(0, len(layout.missing), CHUNK):
            yield scan.keys[layout.missing[a : a + CHUNK]]

    slots = len(layout.base_keys) + len(layout.missing)
    tensors = {"rows": (torch.int64, scan.rows.shape, slot_rows()), "keys": (torch.uint8, (slots, 16), slot_keys())}
    if scan.has_ids:
        tensors.update((k, (dtype, shape, file_chunks(path))) for k, (dtype, shape, path) in scan.id_tensors().items())
    return write_streamed(out, name, tensors)


# --- the job ----------------------------------------------------------------------------
def precompute(tc: TextConditioner, job: PrecomputeJob) -> dict:
    """Encode ``job.input`` with ``tc`` into the store ``job.out``, adding to it; returns its manifest.

    Captions the store holds already are not encoded again (the returned ``manifest["run"]`` counts
    ``encoded`` and ``reused``; it is not written to disk).
    Under torchrun every rank calls this with its own ``tc`` (see ``rank_device``); rank 0 reads the
    input and the other ranks read the captions they encode from its scan folder in ``job.out``,
    which must be one folder that all ranks see. With ``job.part = (i, n)`` this process encodes
    part i of n and the last part to finish publishes the store (its manifest says ``complete``
    then; earlier parts return it incomplete).
    """
    if tc.spec.long_prompts != "truncate":
        raise ValueError(f"precompute stores [{tc.max_length}, D] sequences; encoder {tc.spec.name!r} has "
                         f"long_prompts={tc.spec.long_prompts!r}: load it with long_prompts='truncate'")
    ranks, lock = Ranks.from_env(), StoreLock(job.out)  # rank 0 holds the lock for the whole job
    if job.part is not None and ranks.world > 1:
        raise ValueError("--part splits a job across independent processes; under torchrun the ranks split it")
    part, parts = job.part or (ranks.rank, ranks.world)
    mine: list = []  # rank 0's scan and layout (too big to broadcast)
    with process_group(ranks), closing(lock):
        try:
            return _run(tc, job, ranks, lock, part, parts, mine)
        finally:
            if mine:
                mine[0].close()


def _start(tc: TextConditioner, job: PrecomputeJob, lock: StoreLock, mine: list) -> dict:
    """Rank 0 (or a part): the scan, then the plan."""
    open_out(job)
    scan = scan_captions(job.input, column=job.columns, id_column=job.id_column, limit=job.limit,
                         progress=job.progress, folder=job.out)
    mine.append(scan)
    plan, layout = prepare(tc, job, scan, lock)
    mine.append(layout)
    return plan


def _run(tc: TextConditioner, job: PrecomputeJob, ranks: Ranks, lock: StoreLock, part: int, parts: int,
         mine: list) -> dict:
    ranks.check_same((tc.fingerprint, str(tc.dtype)), "weights fingerprint, dtype")
    plan = ranks.on_main(lambda: _start(tc, job, lock, mine))
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
        folder = job.out / plan["scan"]
        texts = CaptionTexts(folder / "texts", np.fromfile(folder / TODO, dtype=np.int64).reshape(-1, 2))
        captions = SlotCaptions(texts, plan["slots"] - plan["run"]["encoded"])
        stats = encode_shards(tc, captions, [tuple(s) for s in todo], job.out, batch_size=job.batch_size,
                              meta=meta, progress=job.progress and ranks.rank == 0)
        logger.info("%s %d: %s", "part" if job.part else "rank", part, stats.summary(),
                    extra={"pipeline_stats": stats})
    ranks.barrier()
    if not plan["new_shards"] and plan["complete"]:
        return _written(plan) | {"run": plan["run"]}
    if job.part is not None:
        lock.acquire(wait=True)
    manifest = ranks.on_main(lambda: finalize(job.out, plan, mine[1], mine[0], parts=job.part is not None))
    if manifest is None:
        logger.info("part %d/%d done; the store is published by the last part to finish", part, parts)
        return {**read_manifest(job.out), "run": {**plan["run"], "waiting": True}}
    return manifest


class SlotCaptions(Sequence[str]):
    """Captions by slot for the pipeline: slot ``first + i`` holds ``texts[i]``."""

    def __init__(self, texts: CaptionTexts, first: int) -> None:
        self.texts, self.first = texts, first

    def __len__(self) -> int:
        return self.first + len(self.texts)

    def __getitem__(self, i: int | slice) -> str | list[str]:  # type: ignore[override]
        if isinstance(i, slice):
            return self.texts[i.start - self.first : i.stop - self.first]
        return self.texts[i - self.first]
