"""What a precompute run will publish: slots for the input's captions, the new shards, the manifest.

Rank 0 (or each part) works this out after the scan (clipcond/precompute/scan.py): captions the store holds
keep their slots, the others get new slots after the last one, cut into new shards of
``shard_size``. A ``Plan`` is the manifest the run publishes, but for the index and the new
shards' entries, with what only the run needs (the new shards, its counts, its scan folder).
Everything here follows from the scan and the store, so parts and reruns agree on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipcond.precompute.scan import CHUNK, Scan
from clipcond.store.format import IndexFormat, ShardFormat, StoreFiles
from clipcond.store.layout import RowLayout
from clipcond.store.manifest import MANIFEST, Manifest, ShardEntry

if TYPE_CHECKING:
    from clipcond.encoders.conditioner import TextConditioner

logger = logging.getLogger(__name__)

NewShard = tuple[int, int, int]  # (k, first slot, stop)


@dataclass
class Layout:
    """Where each unique caption of the input lives after this run (rank 0 only: never broadcast)."""

    keep: list[ShardEntry]  # the base store's shards kept
    base_keys: np.ndarray  # [base slots, 16] uint8: their caption keys (new slots': scan.keys[missing])
    slots: np.ndarray  # [U] int64: the slot of each unique caption
    missing: np.ndarray  # [M] int64: unique captions this run encodes (in slot order: first_new + i)
    dropped: list[str]  # damaged base shards left out (their captions, if still used, are encoded again)


def assign_slots(out: Path, base: Manifest | None, scan: Scan, checksums: bool = False,
                 lengths: Callable[[Sequence[str]], np.ndarray] | None = None) -> Layout:
    """Captions the base store holds keep their slots; the others get new slots after its last one, in order of
    first appearance, or (``lengths``: a masked recipe's kept rows per caption) from the shortest to the longest,
    so that a batch's captions have about one length and the encoder runs to little more than each one's."""
    keep, dropped = [], []
    base_keys = np.zeros((0, 16), dtype=np.uint8)
    if base is not None:
        try:
            base_keys = np.array(IndexFormat.read(out, base)["keys"])  # [slots, 16], the index checked first
        except (FileNotFoundError, ValueError) as err:  # missing or damaged (not unreadable: a PermissionError or
            # an I/O error stops the run): no stored slot can be matched to its caption
            logger.warning("%s; without the index no stored embedding can be matched to its caption: every caption "
                           "is encoded again", err)
            base_keys, dropped = np.zeros((base.slots, 16), dtype=np.uint8), [e.file for e in base.shards]
        for entry in base.shards if not dropped else ():
            if entry.problem(out, checksums) is not None:
                logger.warning("%s: damaged or missing; its captions are encoded again", out / entry.file)
                dropped.append(entry.file)
            else:
                keep.append(entry)
    held = np.concatenate([np.arange(e.start, e.stop) for e in keep] or [np.zeros(0, np.int64)])  # [H]
    found = find_keys(base_keys[held], scan.keys)  # [U]: index into held, -1 where no kept shard holds it
    slots = np.full(scan.unique, -1, dtype=np.int64)
    slots[found >= 0] = held[found[found >= 0]]
    missing = np.flatnonzero(found < 0)  # [M], ascending: new slots in order of first appearance
    del found
    if lengths is not None and len(missing):
        kept = np.concatenate([lengths(scan.captions(missing[a : a + CHUNK])) for a in range(0, len(missing), CHUNK)])
        missing = missing[np.argsort(kept, kind="stable")]  # ties in order of first appearance: reruns agree
    first_new = base.slots if base is not None else 0
    slots[missing] = np.arange(first_new, first_new + len(missing))
    return Layout(keep, base_keys, slots, missing, dropped)


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


@dataclass(frozen=True, slots=True)
class Plan:
    """The manifest a run publishes (its ``index`` and new shards' entries still to come), and the run's own facts."""

    manifest: Manifest
    new_shards: tuple[NewShard, ...]
    encoded: int  # distinct captions this run encodes
    reused: int  # distinct captions of the input the store holds already
    base_generation: str | None  # the store version this run adds to (None: a new store)
    scan: str | None = None  # rank 0's scan folder in the store folder: the captions the other ranks encode

    @property
    def run(self) -> dict[str, int]:
        return {"encoded": self.encoded, "reused": self.reused}

    @property
    def first_new_slot(self) -> int:
        return self.manifest.slots - self.encoded


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def store_identity(tc: TextConditioner, shard_size: int) -> dict:
    """What a store is bound to: the encoder's semantics, its weights, dtype, shards' size (not the input)."""
    return {"encoder": tc.spec.to_dict(), "fingerprint": tc.fingerprint, "dtype": str(tc.dtype).removeprefix("torch."),
            "sequence_shape": (tc.max_length, tc.sequence_dim), "pooled_dim": tc.pooled_dim, "shard_size": shard_size,
            "parts": RowLayout.of(tc.spec).to_json()}


def make_plan(tc: TextConditioner, scan: Scan, shard_size: int, base: Manifest | None, layout: Layout) -> Plan:
    """The plan from what the stages before found: the scan (the input), the base store and the slots."""
    from clipcond._version import __version__

    first_slot, next_shard = (base.slots, base.next_shard) if base is not None else (0, 0)
    missing = len(layout.missing)
    # Which caption goes to which shard and batch follows from these: parts and reruns agree on it.
    plan_id = _digest(base.generation if base else None, shard_size, scan.sha256, missing)
    new = tuple((next_shard + i, first_slot + a, first_slot + min(a + shard_size, missing))
                for i, a in enumerate(range(0, missing, shard_size)))
    source = scan.source
    manifest = Manifest(
        clipcond_version=__version__, complete=False, **store_identity(tc, shard_size), input=source,
        has_ids=scan.has_ids, rows=len(scan.rows), variants=scan.variants, unique=scan.unique,
        slots=first_slot + missing, next_shard=next_shard + len(new), num_shards=len(layout.keep) + len(new),
        plan=plan_id, generation=_digest(plan_id, source.to_json()), truncated=0, index=None, null=None,
        shards=tuple(layout.keep))
    return Plan(manifest, new, encoded=missing, reused=scan.unique - missing,
                base_generation=base.generation if base else None)


def _short(value: object) -> str:
    if isinstance(value, dict):  # an encoder spec: its name and a digest of all its fields
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        return f"spec {value['name']!r} (fields {digest})"
    text = str(value)
    return text if len(text) <= 20 else text[:16] + "..."


def check_unchanged(out: Path, existing: Manifest | None, plan: Plan) -> None:
    """Before publishing: the store is still the version this run planned from (parts run unlocked)."""
    now = existing.generation if existing is not None and existing.complete else None
    if now != plan.base_generation:
        raise RuntimeError(f"{out} changed while this run encoded: it is now version {now}, this run planned from "
                           f"{plan.base_generation}. Nothing was published; rerun the same command")


def check_compatible(existing: Manifest, identity: dict, out: Path) -> None:
    """Refuse to add to a store made with other weights, spec, dtype or shard size (any input is fine)."""
    # Descriptive spec fields (source, hub_repo) may change between releases, as in the fingerprint; pad_to is the
    # reader's choice (the store holds the kept rows either way).
    old, new = ({k: v for k, v in e.items() if k not in ("source", "hub_repo", "pad_to")}
                for e in (existing.encoder, identity["encoder"]))
    diffs = [f"encoder: the store has {_short(old)}, this run {_short(new)}"] if old != new else []
    diffs += [f"{key}: the store has {_short(getattr(existing, key))}, this run {_short(identity[key])}"
              for key in ("fingerprint", "dtype", "shard_size") if getattr(existing, key) != identity[key]]
    if existing.layout.to_json() != identity["parts"]:
        diffs.append(f"row layout: the store has {existing.layout.to_json()}, this run {identity['parts']}")
    if diffs:
        raise ValueError(f"{out} holds a store made differently; refusing to add to it:\n  " + "\n  ".join(diffs)
                         + f"\nwrite to another --out, or delete {out} to start over")


def refuse_foreign(out: Path) -> None:
    """A folder without a manifest must be empty, or what a killed run leaves: index, null, temporaries."""
    if (out / MANIFEST).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if not StoreFiles.ours(p.name))
    if foreign:
        raise ValueError(f"{out} is not empty and holds no {MANIFEST} (it has {foreign[:5]}): not a clipcond "
                         "store; write to a new or empty --out")


def done_shards(out: Path, plan: Plan, existing: Manifest | None) -> dict[int, ShardEntry]:
    """New shards of this plan whose file is whole (its size as recorded); the rest are encoded (again)."""
    expected = {ShardFormat.name(k): (k, start, stop) for k, start, stop in plan.new_shards}
    entries = list(existing.shards if existing is not None else ())
    entries += [e for sidecar in sorted(out.glob(StoreFiles.SIDECARS)) if (e := ShardFormat.read_sidecar(sidecar))]
    done = {}
    for entry in entries:
        k, *rows = expected.get(entry.file, (None, None, None))
        path = out / entry.file
        if (k is not None and [entry.start, entry.stop] == rows and entry.plan == plan.manifest.plan
                and path.is_file() and path.stat().st_size == entry.bytes):
            done[k] = entry
    return done


def clean(out: Path, plan: Plan, *, temporaries: bool = True) -> None:
    """Remove damaged shards, shards and sidecars of other plans (a killed run's), and (``temporaries``: no
    part of this plan may be writing now) half-written files."""
    keep = {e.file for e in plan.manifest.shards} | {ShardFormat.name(k) for k, _, _ in plan.new_shards}
    keep |= {ShardFormat.sidecar(n) for n in keep}
    for path in StoreFiles.unlisted(out, keep, temporaries=temporaries, indexes=False):
        path.unlink(missing_ok=True)

