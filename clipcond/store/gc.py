"""``clipcond gc OUT``: drop the embeddings no row of a store refers to any more.

An incremental ``precompute`` never deletes: captions that left the input keep their rows in the
shards (a reader of the previous version may still want them). ``collect`` removes them: a shard
whose embeddings are all unreferenced is deleted, one partly referenced is rewritten under a new
shard number (names are never reused, so a name always means the same rows), then the new index
and manifest are published atomically, and only then are the old files deleted. Killed at any
point, the store is the old version or the new one, and the next run (gc or precompute) removes
what the killed one left.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from clipcond.store.checksums import part_checksums
from clipcond.store.format import IndexFormat, ShardFormat, StoreFiles, read_rows
from clipcond.store.locks import PartsLock, StoreLock, remove_stale_scans
from clipcond.store.manifest import READ_VERSIONS, Manifest, ShardEntry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Collected:
    removed: int  # embeddings removed
    kept: int  # embeddings left
    rewritten: int  # shards rewritten without their unreferenced rows
    deleted: int  # shards deleted whole


def collect(out: str | os.PathLike[str]) -> Collected:
    """Remove unreferenced embeddings from the complete store ``out`` (holding its lock)."""
    out = Path(out)
    Manifest.read(out)  # not a store (a missing path, a folder of photos): refused before a lock file lands there
    lock = StoreLock(out)
    lock.acquire()
    try:
        PartsLock.check(out, None, "gc would delete its finished shards and reuse their numbers")
        manifest = Manifest.read(out)
        if manifest.format_version not in READ_VERSIONS or not manifest.complete:
            raise ValueError(f"{out}: gc needs a complete store of version {READ_VERSIONS} (this one: version "
                             f"{manifest.format_version}, {'complete' if manifest.complete else 'incomplete'})")
        if problems := manifest.problems(out):
            raise ValueError(f"{out}: damaged, gc would lose rows: {problems[0]}; rerun `clipcond precompute` first")
        _remove_unlisted(out, manifest)
        index = {name: torch.from_numpy(np.array(a)) for name, a in IndexFormat.read(out, manifest).items()}  # checked
        new, result = _compact(out, manifest, index)
        if new is None:
            logger.info("%s: every stored embedding is referenced; nothing to remove", out)
            return result
        new.write(out)  # the commit point: before it the old version, after it the new
        _remove_unlisted(out, new)
        return result
    finally:
        lock.close()


def _compact(out: Path, manifest: Manifest, index: dict[str, torch.Tensor]) -> tuple[Manifest | None, Collected]:
    rows, keys = index["rows"], index["keys"]  # [N, k] slots (-1: a row with fewer variants), [slots, 16]
    present = rows != IndexFormat.MISSING  # [N, k]; indexing with -1 would mark (and remap) the last slot
    referenced = torch.zeros(manifest.slots, dtype=torch.bool)
    referenced[rows[present]] = True
    remap = torch.arange(manifest.slots)  # old slot -> new slot
    shards, new_keys = [], []
    slots, next_shard, rewritten, deleted, removed = manifest.slots, manifest.next_shard, 0, 0, 0
    layout = manifest.layout
    for entry in manifest.shards:
        used = referenced[entry.start : entry.stop]  # [n]
        if used.all():
            shards.append(entry)
            continue
        removed += int((~used).sum())
        if not used.any():
            deleted += 1
            continue
        old = used.nonzero().flatten() + entry.start  # [m] slots kept
        local = old - entry.start
        parts, pooled, lengths, check = read_rows(out / entry.file, layout, local)
        bad = part_checksums(parts, pooled, lengths) != check
        if bad.any():  # rewritten, a damaged row would get a checksum that matches: refuse instead
            raise ValueError(f"{out / entry.file}: rows {local[bad].tolist()[:10]} fail their checksum; gc would "
                             "rewrite them as if whole. Rerun `clipcond precompute ... --verify` first, then gc")
        meta = {"gc_of": entry.file, "start": slots, "stop": slots + len(old)}
        written = ShardFormat.write(out, next_shard, layout, parts, pooled, lengths, meta)
        shards.append(ShardEntry(file=written.file, bytes=written.bytes, sha256=written.sha256, start=slots,
                                 stop=slots + len(old), plan=f"gc:{manifest.generation}"))
        remap[old] = torch.arange(slots, slots + len(old))
        new_keys.append(keys[old])
        slots, next_shard, rewritten = slots + len(old), next_shard + 1, rewritten + 1
    kept = int(referenced.sum())
    result = Collected(removed=removed, kept=kept, rewritten=rewritten, deleted=deleted)
    if not removed:
        return None, result
    generation = f"gc{manifest.generation[:14]}"
    rows = torch.where(present, remap[rows.clamp(min=0)], IndexFormat.MISSING)  # -1 stays -1
    keys = torch.cat([keys, *new_keys])
    ids = {name: (index[name].dtype, tuple(index[name].shape), [index[name].numpy()]) for name in IndexFormat.IDS
           if name in index} or None
    written = IndexFormat.write(out, generation, (tuple(rows.shape), [rows.numpy()]), (len(keys), [keys.numpy()]), ids)
    shards.sort(key=lambda entry: entry.start)  # readers find a slot's shard by bisection
    return replace(manifest, shards=tuple(shards), slots=slots, next_shard=next_shard, generation=generation,
                   index=written, truncated=sum(entry.truncated for entry in shards)), result


def _remove_unlisted(out: Path, manifest: Manifest) -> None:
    """Shards and indexes the manifest does not list (old versions, a killed run's files), temporaries and
    killed runs' scan folders."""
    listed = {entry.file for entry in manifest.shards} | {manifest.index.file}
    remove_stale_scans(out)
    for path in StoreFiles.unlisted(out, listed):
        path.unlink(missing_ok=True)
