"""``clipcond precompute``: a caption dataset encoded once into an ``EmbeddingStore`` folder.

Replaces the precompute loops of diffusers' ``train_text_to_image_sdxl.py`` (``encode_prompt``
over ``datasets.map``) and kohya sd-scripts' ``--cache_text_encoder_outputs``, and adds:

- deduplication: identical captions are encoded and stored once (the first pass: clipcond/precompute/scan.py;
  slots and new shards: clipcond/precompute/plan.py);
- crash safety: every file is written atomically (clipcond/_files.py), a shard's manifest entry
  (a ``shard-XXXXX.json`` sidecar) before the shard itself, so a run killed at any point and rerun
  with the same command keeps the whole shards, encodes the rest, and ends with every row once;
  a store of other weights, spec, dtype or input is refused;
- scale-out: under ``torchrun`` rank r encodes shards k = r (mod world size) and writes its own
  files; rank 0 scans the input and writes the null before, the index and the manifest after; the
  other ranks read their captions from its scan folder (gloo barriers and small broadcasts; no
  tensor crosses ranks, so CPU ``gloo`` is enough on GPUs too); ``--part I/N`` for schedulers;
- overlap: a thread tokenizes ahead of the encoder and a thread streams the rows to disk behind
  it (clipcond/precompute/encode.py); the run logs how long the device sat idle waiting for them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from clipcond._files import file_chunks, write_tensors
from clipcond.precompute.encode import encode_shards
from clipcond.precompute.plan import (
    Layout,
    Plan,
    assign_slots,
    check_compatible,
    check_unchanged,
    clean,
    done_shards,
    make_plan,
    refuse_foreign,
    store_identity,
)
from clipcond.precompute.scan import CHUNK, CaptionTexts, Scan, scan_captions
from clipcond.precompute.scan_cache import ScanCache
from clipcond.specs import spec_from_dict
from clipcond.store.format import IndexFormat, StoreFiles
from clipcond.store.layout import RowLayout
from clipcond.store.locks import PartsLock, StoreLock, remove_stale_scans
from clipcond.store.manifest import FORMAT, FORMAT_VERSION, MANIFEST, NULL, FileEntry, Manifest

if TYPE_CHECKING:
    from clipcond.encoders.conditioner import TextConditioner

logger = logging.getLogger(__name__)
T = TypeVar("T")

TARGET_SHARD_BYTES = 256 * 2**20  # default shard size: few files, yet one shard re-encodes in seconds
KEPT_ROWS = 64  # a masked recipe's rows a caption, for the default shard size (LAION captions keep ~26 T5 rows)
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
    """Rows a shard holds to be about ``TARGET_SHARD_BYTES``; a masked recipe's rows sized at ``KEPT_ROWS``."""
    layout = RowLayout.of(tc.spec)
    kept = min(KEPT_ROWS, layout.length) if layout.masked else None
    row_bytes = layout.row_bytes(tc.dtype.itemsize, kept) + tc.pooled_dim * tc.dtype.itemsize
    rows = max(1, int(TARGET_SHARD_BYTES // row_bytes))
    return rows - rows % batch_size if rows >= batch_size else rows  # whole batches: no short batch per shard


def open_out(job: PrecomputeJob) -> None:
    """The store folder, made if need be; one holding anything but a store is refused."""
    if job.out.exists() and not job.out.is_dir():
        raise ValueError(f"--out {job.out} is a file; the store is a folder")
    job.out.mkdir(parents=True, exist_ok=True)
    refuse_foreign(job.out)  # before a lock file or a scan lands in it


def prepare(tc: TextConditioner, job: PrecomputeJob, scan: Scan, lock: StoreLock,
            parts: PartsLock | None = None) -> tuple[Plan, Layout]:
    """Lock, then check or start the store: ``(plan, layout)``; a new store gets an incomplete manifest.

    A part (``job.part``) joins ``parts`` for its plan: only parts of the same plan run side by side."""
    out = job.out
    lock.acquire(wait=job.part is not None)
    remove_stale_scans(out)  # killed runs' scan folders (and their copy of the captions)
    existing = Manifest.read(out) if (out / MANIFEST).is_file() else None  # no other run writes it now
    shard_size = job.shard_size or (existing.shard_size if existing else default_shard_size(tc, job.batch_size))
    if existing is not None:
        check_compatible(existing, store_identity(tc, shard_size), out)
    base = existing if existing and existing.complete else None  # incremental runs never unmark a store
    layout = assign_slots(out, base, scan, checksums=job.verify, lengths=kept_lengths(tc))
    plan = make_plan(tc, scan, shard_size, base, layout)
    current = base or existing
    null = current.null if current is not None else None
    if null is None or null.problem(out) is not None:
        # The null depends on the encoder alone: rewritten, it is the same bytes the manifest records.
        null = FileEntry.from_json(write_tensors(out, NULL, null_tensors(tc)))
    plan = replace(plan, manifest=replace(plan.manifest, null=null))
    if base is not None and base.input == plan.manifest.input and not plan.encoded and not layout.dropped:
        logger.info("%s is complete already: nothing to encode", out)
        return replace(plan, manifest=base, new_shards=()), layout
    if parts is not None:
        parts.join(plan.manifest.plan, job.part[1])
    else:
        PartsLock.check(out, plan.manifest.plan, f"this run has plan {plan.manifest.plan}")
    clean(out, plan, temporaries=job.part is None)
    if base is None:  # a new store: refused as incomplete until its last shard is in
        done = done_shards(out, plan, existing)
        replace(plan.manifest, shards=tuple(done[k] for k in sorted(done))).write(out)
    # The captions to encode, by slot, for the other ranks: spans of the scan's texts (in out, seen by all).
    scan.spans[layout.missing].tofile(scan.folder.file(TODO))
    return replace(plan, scan=scan.folder.path.name), layout


def null_tensors(tc: TextConditioner) -> dict[str, torch.Tensor]:
    """What ``null.safetensors`` holds: the null at the recipe's full length, a masked recipe's mask with it."""
    null = tc.null(1)
    if null.mask is not None:
        null = null.padded(tc.max_length)
    tensors = {"sequence": null.sequence.cpu(), "pooled": null.pooled.cpu()}
    return tensors if null.mask is None else {**tensors, "mask": null.mask.cpu()}


def kept_lengths(tc: TextConditioner) -> Callable[[Sequence[str]], np.ndarray] | None:
    """A masked recipe's rows kept per caption, from its tokenizer (the plan orders new captions by it)."""
    if not RowLayout.of(tc.spec).masked:
        return None
    return lambda captions: tc.kept_lengths(tc.tokenize(list(captions))).numpy()


TODO = "todo"  # in the scan folder: [M, 2] int64 spans of the captions this run encodes, in slot order


def finalize(out: Path, plan: Plan, layout: Layout, scan: Scan, *, parts: bool = False) -> Manifest | None:
    """Every new shard is written: publish the index, then the manifest (the new version, atomically).

    With parts, the last part to finish does it; an earlier one returns None.
    """
    existing = Manifest.read(out) if (out / MANIFEST).is_file() else None
    if existing is not None and existing.complete and existing.generation == plan.manifest.generation:
        return existing  # another part published this very version
    check_unchanged(out, existing, plan)
    done = done_shards(out, plan, existing)
    missing = [k for k, _, _ in plan.new_shards if k not in done]
    if missing:
        if parts:
            return None
        raise RuntimeError(f"{out}: {len(missing)} shards were written by no rank (first: {missing[:10]})")
    shards = (*layout.keep, *(done[k] for k, _, _ in plan.new_shards))
    manifest = replace(plan.manifest, shards=shards, index=write_index(out, plan, layout, scan), complete=True,
                       truncated=sum(entry.truncated for entry in shards))
    manifest.write(out)
    PartsLock.finished(out)
    for path in StoreFiles.leftovers(out):  # sidecars, and half-written files of killed parts (all parts are done)
        path.unlink(missing_ok=True)
    if manifest.truncated:
        logger.warning("%d unique captions were longer than %s and were truncated, as diffusers does",
                       manifest.truncated, spec_from_dict(manifest.encoder).token_limits)
    return manifest


def write_index(out: Path, plan: Plan, layout: Layout, scan: Scan) -> FileEntry:
    """The index of this version: each row's slots (-1 after a row's own variants), each slot's key, the ids;
    streamed, never held twice."""
    flat = scan.rows.reshape(-1)

    def rows() -> Iterator[np.ndarray]:
        for a in range(0, len(flat), CHUNK):
            unique = flat[a : a + CHUNK]
            yield np.where(unique >= 0, layout.slots[unique], -1).astype("<i8", copy=False)  # as safetensors holds it

    def keys() -> Iterator[np.ndarray]:
        yield layout.base_keys
        for a in range(0, len(layout.missing), CHUNK):
            yield scan.keys[layout.missing[a : a + CHUNK]]

    ids = {k: (dtype, shape, file_chunks(path)) for k, (dtype, shape, path) in scan.id_tensors().items()}
    return IndexFormat.write(out, plan.manifest.generation, (scan.rows.shape, rows()),
                             (len(layout.base_keys) + len(layout.missing), keys()), ids if scan.has_ids else None)


# --- the job ----------------------------------------------------------------------------
@dataclass
class Planned:
    """What rank 0's (or a part's) scan and planning stages hand to publishing: too big to broadcast."""

    scan: Scan | None = None
    layout: Layout | None = None


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
    mine = Planned()  # rank 0's scan and layout (too big to broadcast)
    with process_group(ranks), closing(lock), closing(PartsLock(job.out)) as running:
        try:
            return _run(tc, job, ranks, (lock, running), part, parts, mine)
        finally:
            if mine.scan is not None:
                mine.scan.close()


def _start(tc: TextConditioner, job: PrecomputeJob, locks: tuple[StoreLock, PartsLock], mine: Planned) -> Plan:
    """Rank 0 (or a part): the scan, then the plan."""
    made = not job.out.exists()
    open_out(job)
    try:
        scan = scan_captions(job.input, column=job.columns, id_column=job.id_column, limit=job.limit,
                             progress=job.progress, folder=job.out, cache=ScanCache(job.out / StoreFiles.SCAN_CACHE))
    except BaseException:
        if made:  # refused input: no empty store folder left behind (one a part beside us uses is not empty)
            with suppress(OSError):
                job.out.rmdir()
        raise
    mine.scan = scan
    plan, layout = prepare(tc, job, scan, locks[0], locks[1] if job.part is not None else None)
    mine.layout = layout
    return plan


def _run(tc: TextConditioner, job: PrecomputeJob, ranks: Ranks, locks: tuple[StoreLock, PartsLock], part: int,
         parts: int, mine: Planned) -> dict:
    """Scan and plan (rank 0), encode this rank's or part's shards, publish (rank 0, or the last part)."""
    lock = locks[0]  # the store's: held by rank 0 for the whole job; by parts only to plan and to publish
    ranks.check_same((tc.fingerprint, str(tc.dtype)), "weights fingerprint, dtype")
    plan: Plan = ranks.on_main(lambda: _start(tc, job, locks, mine))
    m = plan.manifest
    if job.part is not None:
        lock.close()  # parts encode side by side; the lock is taken again to publish
    done = done_shards(job.out, plan, None) if plan.new_shards else {}
    todo = [s for i, s in enumerate(plan.new_shards) if i % parts == part and s[0] not in done]
    logger.info("%s %d/%d: %d shards to encode (%d of %d new shards done before); %d new captions, %d found "
                "in the store", "part" if job.part else "rank", part, parts, len(todo), len(done),
                len(plan.new_shards), plan.encoded, plan.reused)
    if todo:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": m.encoder["name"],
                "fingerprint": m.fingerprint, "dtype": m.dtype, "plan": m.plan}
        folder = job.out / plan.scan
        texts = CaptionTexts(folder / "texts", np.fromfile(folder / TODO, dtype=np.int64).reshape(-1, 2))
        stats = encode_shards(tc, SlotCaptions(texts, plan.first_new_slot), list(todo), job.out,
                              batch_size=job.batch_size, meta=meta, progress=job.progress and ranks.rank == 0)
        logger.info("%s %d: %s", "part" if job.part else "rank", part, stats.summary(),
                    extra={"pipeline_stats": stats})
    ranks.barrier()
    if not plan.new_shards and m.complete:
        return m.to_json() | {"run": plan.run}
    if job.part is not None:
        lock.acquire(wait=True)
    manifest = ranks.on_main(lambda: finalize(job.out, plan, mine.layout, mine.scan, parts=job.part is not None))
    if manifest is None:
        logger.info("part %d/%d done; the store is published by the last part to finish", part, parts)
        return Manifest.read(job.out).to_json() | {"run": {**plan.run, "waiting": True}}
    return manifest.to_json() | {"run": plan.run}


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
