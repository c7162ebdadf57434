"""The precompute pipeline: a thread tokenizes ahead of the encoder, a thread writes behind it.

Three stages joined by bounded queues (``PREFETCH`` batches each), so the encoder waits on
neither tokenization nor disk, and memory stays bounded; the writer streams each shard to disk
and hands full shards to a fourth thread for fsync and rename. The encoder runs on the caller's
thread (``torch.compile`` and CUDA graphs live there). ``PipelineStats`` tells where the encoder's
time went, including how long the device sat idle for want of input: on CUDA the encoder thread
only queues kernels, so a wait counts as idle only from the moment the stream has drained.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clipcond.conditioning import Conditioning
from clipcond.store.format import ShardFormat, ShardWriter
from clipcond.store.layout import RowLayout
from clipcond.store.manifest import Manifest, ShardEntry
from clipcond.text.tokenizer import Tokens

if TYPE_CHECKING:
    from clipcond.encoders.conditioner import TextConditioner

PREFETCH = 4  # batches queued between stages: hides tokenizer/writer latency, bounds memory
FLUSHING = 2  # full shards waiting for their fsync at most: bounds the dirty page cache
POLL = 0.1  # seconds between checks that another stage has not failed
DRAIN_POLL = 0.001  # while the device still has work queued: how often to ask whether it finished
DELAY_ENV = "CLIPCOND_PRECOMPUTE_BATCH_DELAY"  # seconds to sleep after each batch: lets tests SIGKILL mid-run

Shard = tuple[int, int, int]  # (k, first slot, stop): captions[slot] is encoded into slot


@dataclass(slots=True)
class PipelineStats:
    """Where the encoder thread's time went, in seconds."""

    batches: int = 0
    rows: int = 0
    seconds: float = 0.0  # the encoder loop, first wait to last hand-off
    encoding: float = 0.0  # inside ``encode_tokens`` (on CUDA: queueing the kernels)
    waiting_tokens: float = 0.0  # blocked on the tokenizer thread
    waiting_writer: float = 0.0  # blocked on the writer thread (the output queue was full)
    device_idle: float = 0.0  # of the waits, the time the device had no work (on CPU: all of it)

    @property
    def busy(self) -> float:
        """1 - the share of the loop the device sat idle while the encoder waited for tokens or the writer.

        1.0: it never waited on tokenization or disk. Launch gaps between kernels are not counted,
        nor the device's work after the last batch was queued."""
        return 1.0 - self.device_idle / self.seconds if self.seconds else 1.0

    def summary(self) -> str:
        return (f"device busy {self.busy:.1%} of {self.seconds:.2f} s ({self.batches} batches): "
                f"idle {self.device_idle:.2f} s; waited {self.waiting_tokens:.2f} s for tokens, "
                f"{self.waiting_writer:.2f} s for the writer")


class Stopped(Exception):
    """Another stage failed: unwind without a second error."""


class _Stage(threading.Thread):
    """A pipeline thread; its exception stops the pipeline and is re-raised by the caller."""

    def __init__(self, name: str, fn: Callable[[], None], halt: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.fn, self.halt, self.error = fn, halt, None

    def run(self) -> None:
        try:
            self.fn()
        except Stopped:
            pass
        except BaseException as err:  # noqa: B036 (handed to the main thread, which re-raises it)
            self.error = err
            self.halt.set()


_DONE = object()


def _put(q: queue.Queue, item: object, halt: threading.Event) -> None:
    while not halt.is_set():
        try:
            return q.put(item, timeout=POLL)
        except queue.Full:
            continue
    raise Stopped


def _get(q: queue.Queue, halt: threading.Event) -> object:
    while not halt.is_set():
        try:
            return q.get(timeout=POLL)
        except queue.Empty:
            continue
    raise Stopped


class _Clock:
    """The encoder's waits, and the part of each during which the device had nothing to do."""

    def __init__(self, device: torch.device, halt: threading.Event, stats: PipelineStats) -> None:
        self.halt, self.stats = halt, stats
        self.drained = torch.cuda.current_stream(device).query if device.type == "cuda" else lambda: True

    def _wait(self, step: Callable[[float], object]) -> tuple[object, float, float]:
        """Call ``step(timeout)`` until it succeeds; returns (its result, waited, device idle)."""
        start = time.perf_counter()
        idle_since = start if self.drained() else None
        while not self.halt.is_set():
            try:
                result = step(POLL if idle_since is not None else DRAIN_POLL)
            except (queue.Empty, queue.Full):
                if idle_since is None and self.drained():
                    idle_since = time.perf_counter()
                continue
            end = time.perf_counter()
            return result, end - start, end - idle_since if idle_since is not None else 0.0
        raise Stopped

    def get(self, q: queue.Queue) -> object:
        try:
            return q.get_nowait()
        except queue.Empty:
            item, waited, idle = self._wait(lambda timeout: q.get(timeout=timeout))
            self.stats.waiting_tokens += waited
            self.stats.device_idle += idle
            return item

    def put(self, q: queue.Queue, item: object) -> None:
        try:
            q.put_nowait(item)
        except queue.Full:
            _, waited, idle = self._wait(lambda timeout: q.put(item, timeout=timeout))
            self.stats.waiting_writer += waited
            self.stats.device_idle += idle


@torch.no_grad()
def _tokenize(tc: TextConditioner, captions: Sequence[str], shards: list[Shard], batch_size: int,
              q: queue.Queue, halt: threading.Event) -> None:
    pin = tc.device.type == "cuda"  # pinned host memory: the encoder's copies to the GPU do not block
    masked = RowLayout.of(tc.spec).masked
    for k, start, stop in shards:
        # A masked recipe's shard header needs each row's kept length before the first row is encoded: its shard is
        # tokenized whole, then cut into batches; the other encoders' a batch at a time.
        whole = tc.tokenize(captions[start:stop]) if masked else None
        lengths = None if whole is None else tc.kept_lengths(whole)
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            tokens = tc.tokenize(captions[a:b]) if whole is None else [_rows(t, a - start, b - start) for t in whole]
            if pin:
                tokens = [replace(t, ids=t.ids.pin_memory(), eos=t.eos.pin_memory()) for t in tokens]
            _put(q, (k, a - start, tokens, lengths if a == start else None), halt)
    _put(q, _DONE, halt)


def _rows(tokens: Tokens, a: int, b: int) -> Tokens:
    """Rows ``a:b`` of a tokenized batch, their truncation notes renumbered."""
    truncated = tuple((i - a, text) for i, text in tokens.truncated if a <= i < b)
    return replace(tokens, ids=tokens.ids[a:b], eos=tokens.eos[a:b], truncated=truncated)


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[N] True where row n holds no inf/NaN. amax and amin propagate NaN and keep inf: two reads of
    x and no temporary, where isfinite(x) writes a bool per element (~10x slower on float16)."""
    x = x.flatten(1)
    if not x.shape[1]:  # PixArt's pooled [B, 0]: nothing to overflow
        return torch.ones(len(x), dtype=torch.bool)
    return x.amax(1).isfinite() & x.amin(1).isfinite()


class _ShardFile:
    """One shard of the run, streamed to disk batch by batch (``ShardWriter``), then published: its rows checked
    finite and in order, its sidecar (the shard's manifest entry) written before the rename."""

    def __init__(self, out: Path, shard: Shard, like: Conditioning, layout: RowLayout, lengths: torch.Tensor | None,
                 meta: dict[str, object]) -> None:
        self.k, self.start, self.stop = shard
        self.plan, self.truncated, self.filled, self.layout = meta.get("plan"), 0, 0, layout
        self.lengths = None if lengths is None else lengths.numpy()  # [n] rows each caption's mask keeps
        self.writer = ShardWriter(out, self.k, self.stop - self.start, like.dtype, layout, like.pooled.shape[1],
                                  {**meta, "start": self.start, "stop": self.stop}, self.lengths)

    def add(self, k: int, offset: int, cond: Conditioning, truncated: int, captions: Sequence[str]) -> bool:
        """Append one batch; True when the shard is full."""
        if k != self.k or offset != self.filled:
            raise RuntimeError(f"pipeline out of order: shard {k} row {offset}, expected {self.k} row {self.filled}")
        if cond.dtype != self.writer.dtype:
            raise RuntimeError(f"shard {k}: a batch of {cond.dtype} rows after {self.writer.dtype} ones (autocast "
                               "around precompute?)")
        cond = cond.to("cpu")  # to the host here, off the encoder thread
        parts, kept = self.layout.split(cond)
        if kept is not None and not np.array_equal(kept.numpy(), self.lengths[offset : offset + len(cond)]):
            raise RuntimeError(f"shard {k}: the encoder's masks keep other rows than the tokenizer counted")
        finite = _finite_rows(cond.pooled)
        for part in parts:
            finite &= _finite_rows(part)
        if not finite.all():
            bad = [self.start + offset + i for i in (~finite).nonzero().flatten().tolist()]
            shown = ", ".join(f"{captions[i][:60]!r}" for i in bad[:3])
            raise ValueError(f"{len(bad)} captions encode to inf/NaN in {cond.dtype} (unique rows "
                             f"{bad[:10]}: {shown}): the encoder overflows; encode in bfloat16 or float32")
        self.writer.add(parts, cond.pooled)
        self.filled += len(cond)
        self.truncated += truncated
        return self.filled == self.writer.n

    def finish(self, out: Path) -> None:
        name = self.writer.path.name
        try:
            written = self.writer.close()
            owner = _owner(out, name, self.plan)
            if owner == "this plan":  # a duplicate of this part got there first: keep its file (on other
                self.abort()  # hardware the bytes may differ from ours, and it may be published already)
                return
            if owner == "another version":
                self.abort()
                raise RuntimeError(f"{out} changed while this run encoded: {name} was published by another "
                                   "version of the store (a gc, or a run of other input, where file locks do not "
                                   "work). Nothing of this run was published; rerun the same command")
            entry = ShardEntry(file=name, bytes=written.bytes, sha256=written.sha256, start=self.start,
                               stop=self.stop, truncated=self.truncated, plan=self.plan)
            ShardFormat.write_sidecar(out, entry)
            self.writer.publish()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.writer.abort()


def _owner(out: Path, name: str, plan: str | None) -> str | None:
    """Who has a whole file under this shard's name already: "this plan" (its sidecar, or a complete manifest
    of this plan, says so), "another version" (a complete manifest of another plan lists it), or None."""
    entry = ShardFormat.read_sidecar(out / ShardFormat.sidecar(name))
    with suppress(OSError):
        if entry is not None and entry.plan == plan and (out / name).stat().st_size == entry.bytes:
            return "this plan"
    try:
        manifest = Manifest.read(out)
    except (OSError, ValueError):
        return None
    if not manifest.complete or all(e.file != name for e in manifest.shards):
        return None
    return "this plan" if manifest.plan == plan else "another version"


def _write(out: Path, shards: list[Shard], captions: Sequence[str], q: queue.Queue, halt: threading.Event,
           meta: dict[str, object], layout: RowLayout, stream: torch.cuda.Stream | None) -> None:
    """Stream batches into shard files; a second thread fsyncs and publishes each full shard.

    An fsync waits for the disk, and the next shard's writes need not (bench_pipeline.py, 2 GB of
    SDXL float16 rows: 1.2x the rows/s of fsyncing on this thread). Copies to the host run on the
    encoder's CUDA stream, so they follow its kernels whatever stream the caller chose.
    """
    pending, shard, flushing = iter(shards), None, deque()
    with ThreadPoolExecutor(1, thread_name_prefix="clipcond-fsync") as finisher, \
            torch.cuda.stream(stream) if stream is not None else nullcontext():
        try:
            while (item := _get(q, halt)) is not _DONE:
                k, offset, cond, truncated, lengths = item
                if shard is None:
                    shard = _ShardFile(out, next(pending), cond, layout, lengths, meta)
                if shard.add(k, offset, cond, truncated, captions):
                    flushing.append(finisher.submit(shard.finish, out))
                    shard = None
                while flushing and (flushing[0].done() or len(flushing) > FLUSHING):
                    flushing.popleft().result()  # raises a failed fsync or rename here
            if shard is not None or next(pending, None) is not None:
                raise RuntimeError("pipeline ended before its last shard was full")
            while flushing:
                flushing.popleft().result()
        except BaseException:
            halt.set()  # stop the tokenizer and encoder now, not after the pending fsyncs
            raise
        finally:
            if shard is not None:
                shard.abort()  # a half-written shard: its temporary goes, the next run encodes it again


def _encode(tc: TextConditioner, tokens_q: queue.Queue, outputs_q: queue.Queue, halt: threading.Event,
            stats: PipelineStats, progress: bool) -> None:
    from tqdm.auto import tqdm

    delay = float(os.environ.get(DELAY_ENV) or 0)
    clock = _Clock(tc.device, halt, stats)
    start = time.perf_counter()
    with tqdm(total=stats.rows, desc="encode", unit="row", unit_scale=True, disable=None if progress else True) as bar:
        while (item := clock.get(tokens_q)) is not _DONE:
            k, offset, tokens, lengths = item
            t0 = time.perf_counter()
            cond = tc.encode_tokens(tokens)
            stats.encoding += time.perf_counter() - t0
            truncated = len({row for tower in tokens for row, _ in tower.truncated})  # by any tower (SD3: CLIP or T5)
            clock.put(outputs_q, (k, offset, cond, truncated, lengths))
            stats.batches += 1
            bar.update(len(cond))
            if delay:
                time.sleep(delay)
    stats.seconds = time.perf_counter() - start
    _put(outputs_q, _DONE, halt)


def encode_shards(tc: TextConditioner, captions: Sequence[str], shards: list[Shard], out: Path, *,
                  batch_size: int, meta: dict[str, object], progress: bool = True) -> PipelineStats:
    """Encode the unique ``captions`` rows of ``shards`` and write each shard to ``out``."""
    stats = PipelineStats(rows=sum(stop - start for _, start, stop in shards))
    halt = threading.Event()
    tokens_q, outputs_q = queue.Queue(PREFETCH), queue.Queue(PREFETCH)
    stream = torch.cuda.current_stream(tc.device) if tc.device.type == "cuda" else None
    stages = [_Stage("clipcond-tokenize", lambda: _tokenize(tc, captions, shards, batch_size, tokens_q, halt), halt),
              _Stage("clipcond-write", lambda: _write(out, shards, captions, outputs_q, halt, meta,
                                                       RowLayout.of(tc.spec), stream), halt)]
    for stage in stages:
        stage.start()
    try:
        _encode(tc, tokens_q, outputs_q, halt, stats, progress)
        for stage in stages:
            stage.join()
    except Stopped:
        pass  # a stage failed: its error is raised below
    except BaseException:  # Ctrl-C included: the other threads stop too
        halt.set()
        raise
    finally:
        for stage in stages:
            stage.join()
    for stage in stages:
        if stage.error is not None:
            raise stage.error
    return stats
