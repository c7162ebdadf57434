"""Caption dropout for classifier-free guidance on a store's batches (``CaptionDropout``, ``store.collate()``):
rows to the stored null, or each tower's part zeroed as kohya's SD3 scripts do it, the choice a hash of (seed,
epoch, row) only; and the caption variant each row gets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch.utils.data import default_collate

from clipcond.conditioning import Conditioning
from clipcond.encoders.recipes import drop_parts, tower_keys
from clipcond.specs import EncoderSpec
from clipcond.store.batch import Rows
from clipcond.store.handover import Lent

if TYPE_CHECKING:
    from clipcond.store.reader import EmbeddingStore


@dataclass
class CaptionDropout:
    """``collate_fn`` for store items: ``default_collate``, then rows replaced by the null conditioning.

    Row ``r`` is dropped in epoch ``e`` when ``u(seed, e, r) < drop_prob``, ``u`` a hash-based
    uniform in [0, 1): the choice depends on nothing else (not batch size, shuffling, worker count),
    so it is reproducible and changes every epoch. ``variant="random"`` picks each row's caption
    variant the same way (an independent uniform per (seed, epoch, row)). Call ``set_epoch(e)`` before iterating the
    DataLoader each epoch: the epoch lies in shared memory, so DataLoader workers see it, persistent ones too.
    The batch gains ``"dropped"`` ``[B]`` bool (per tower: whether any part of the row was dropped, and
    ``"dropped_towers"``, a ``[B]`` bool per tower key).
    """

    null_sequence: torch.Tensor  # [L, D]
    null_pooled: torch.Tensor  # [P]
    drop_prob: float | Mapping[str, float] = 0.0  # a mapping: per tower (SD3, Flux), see EmbeddingStore.collate
    seed: int = 0
    epoch: int = 0
    variant: int | Literal["random"] = 0  # which caption variant each row gets (store items are variant 0)
    store: EmbeddingStore | None = None  # reads the other variants
    null_mask: torch.Tensor | None = None  # [L] a masked recipe's null's mask
    spec: EncoderSpec | None = None  # the recipe whose towers a per-tower drop_prob names
    longest: bool = False  # a masked pad_to="longest" store: a batch is as long as its longest kept row

    def __post_init__(self) -> None:
        if isinstance(self.drop_prob, Mapping):
            keys = tower_keys(self.spec) if self.spec is not None and self.spec.t5 is not None else None
            if keys is None or self.spec.padding != "raw":
                raise ValueError("drop_prob per tower is for SD3 and Flux stores (unmasked T5 recipes); give one "
                                 "number")
            if sorted(self.drop_prob) != sorted(keys) or not all(0.0 <= p <= 1.0 for p in self.drop_prob.values()):
                raise ValueError(f"{self.spec.name}: drop_prob={{...}} needs a probability in [0, 1] for each of "
                                 f"{keys}, got {dict(self.drop_prob)}")
        elif not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        self._epoch = torch.tensor([self.epoch]).share_memory_()  # [1]: workers hold the collate's copy, not this

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch.fill_(epoch)

    def _uniform(self, rows: Sequence[int] | torch.Tensor, salt: str = "") -> list[float]:
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        epoch = int(self._epoch)  # as set_epoch last set it, in whichever process this runs
        return [int.from_bytes(hashlib.blake2b(f"{self.seed}/{epoch}/{r}{salt}".encode(), digest_size=8)
                               .digest(), "little") / 2**64 for r in rows]

    def dropped(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """``[B]`` bool: which of these input rows this epoch replaces by the null conditioning; per tower, one
        such mask per tower key (an independent uniform per key)."""
        if isinstance(self.drop_prob, Mapping):
            return {key: torch.tensor(self._uniform(rows, f"/{key}"), dtype=torch.float64) < p
                    for key, p in self.drop_prob.items()}
        return torch.tensor(self._uniform(rows), dtype=torch.float64) < self.drop_prob

    def variants(self, rows: Sequence[int] | torch.Tensor) -> list[int]:
        """The caption variant of each row this epoch: fixed, or uniform among the row's own
        ``store.variant_count(row)`` per (seed, epoch, row)."""
        if self.variant != "random":
            return [self.variant] * len(rows)
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        counts = [self.store.variant_count(r) for r in rows]
        return [min(int(u * k), k - 1) for u, k in zip(self._uniform(rows, "/variant"), counts, strict=True)]

    def __call__(self, items: list[dict]) -> dict:
        missing = {"sequence", "pooled", "row"} - set(items[0]) if items else set()
        if missing:
            raise TypeError(f"CaptionDropout needs items with 'sequence', 'pooled' and 'row' (EmbeddingStore "
                            f"items), got keys {sorted(items[0])}")
        if isinstance(items, Rows):  # a batched fetch stacked the rows already: take its tensors, no second copy
            batch = self._stacked(items)
        else:
            if self.store is not None:  # items are variant 0: read the chosen variants instead
                items = [{**item, **self.store.get(item["row"], v)} if v else item
                         for item, v in zip(items, self.variants([item["row"] for item in items]), strict=True)]
            batch = default_collate(items)
        if self.longest and items:
            _trim(batch)
        dropped = self.dropped(batch["row"])  # [B], or per tower
        if isinstance(dropped, dict):  # kohya's SD3 per-tower dropout: each tower's part of a row zeroed
            if any(rows.any() for rows in dropped.values()):
                c = drop_parts(self.spec, Conditioning(batch["sequence"], batch["pooled"]), dropped)
                batch["sequence"], batch["pooled"] = c.sequence, c.pooled
            batch["dropped"] = torch.stack(list(dropped.values())).any(0)  # [B]: some part of the row dropped
            batch["dropped_towers"] = dropped  # {"clip_l": [B], ...}
            return _handed_over(batch, items)
        if isinstance(items, Rows):
            dropped = items.dropped.copy_(dropped)  # in the batch's memory: a worker's batch stays one shared segment
        if dropped.any():
            length = batch["sequence"].shape[1]  # a masked batch's longest row, or the full length
            batch["sequence"][dropped] = self.null_sequence[:length].to(batch["sequence"].dtype)
            batch["pooled"][dropped] = self.null_pooled.to(batch["pooled"].dtype)
            if self.null_mask is not None:
                batch["mask"][dropped] = self.null_mask[:length]
        batch["dropped"] = dropped
        return _handed_over(batch, items)

    def _stacked(self, items: Rows) -> dict:
        """The batch a fetch stacked (``items.batch``), the items' other keys collated, the chosen variants read
        into the rows that get another one than variant 0."""
        batch = dict(items.batch)
        others = [key for key in items[0] if key not in batch] if items else []  # a JoinedDataset's unstacked keys
        batch.update({key: default_collate([item[key] for item in items]) for key in others})
        if self.store is None:
            return batch
        chosen = {i: self.store.get(row, v) for i, (row, v) in  # checked
                  enumerate(zip(batch["row"].tolist(), self.variants(batch["row"]), strict=True)) if v}
        if "mask" in batch and chosen:  # a masked batch as long as its longest row: the chosen ones included
            longest = max(batch["sequence"].shape[1], *(int(c["mask"].sum()) for c in chosen.values()))
            pad = longest - batch["sequence"].shape[1]
            if pad:
                batch["sequence"] = torch.nn.functional.pad(batch["sequence"], (0, 0, 0, pad))
                batch["mask"] = torch.nn.functional.pad(batch["mask"], (0, pad))
        length = batch["sequence"].shape[1]
        for i, c in chosen.items():
            batch["sequence"][i], batch["pooled"][i] = c["sequence"][:length], c["pooled"]
            if "mask" in batch:
                batch["mask"][i] = c["mask"][:length]
        return batch


def _trim(batch: dict) -> None:
    """A masked batch cut to its longest kept row: items read one by one (``store[i]``: full length) or rows that
    got another caption variant than the one the fetch sized the batch for."""
    longest = int(batch["mask"].sum(1).max())  # [B, L] -> the longest row's kept rows
    if longest < batch["sequence"].shape[1]:
        batch["sequence"] = batch["sequence"][:, :longest].contiguous()  # [B, L', D]
        batch["mask"] = batch["mask"][:, :longest].contiguous()  # [B, L']


def _handed_over(batch: dict, items: list[dict]) -> dict:
    """The batch, as a DataLoader worker hands it to the main process through the reused memory its rows lie in
    (clipcond/store/handover.py), where they do."""
    lease = getattr(items, "lease", None)
    return Lent(batch, lease) if lease is not None else batch
