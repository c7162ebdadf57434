"""The locks of a store folder: one writer at a time (``StoreLock``), and a parts job's claim (``PartsLock``).

Both are ``flock``s on files in the store folder, so the kernel drops them when their process ends, however it
ends (SIGKILL included): a killed run never blocks its rerun.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from clipcond.store.format import StoreFiles

logger = logging.getLogger(__name__)


class StoreLock:
    """One writer per store: an exclusive ``flock`` on ``OUT/.clipcond.lock``.

    The kernel drops it when the process ends, however it ends (SIGKILL included), so a killed
    run never blocks its rerun. Where the filesystem has no locks (or there is no ``fcntl``), the
    run goes on unlocked, with a warning.
    """

    NAME = StoreFiles.LOCK

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd = folder, folder / self.NAME, None

    def acquire(self, *, wait: bool = False) -> None:
        """Take the lock; ``wait``: block until the holder lets go (parts take it only briefly)."""
        try:
            import fcntl
        except ImportError:  # Windows
            logger.warning("%s: no file locks on this platform; run one precompute per store at a time", self.folder)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ValueError(f"{self.folder} is being written by another clipcond precompute ({holder}); wait for "
                             "it to finish, or write to another --out") from None
        except OSError as err:  # e.g. ENOLCK on some network filesystems
            os.close(fd)
            logger.warning("%s: cannot lock (%s); run one precompute per store at a time", self.folder, err)
            return
        import socket

        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None


class PartsLock:
    """A parts job (``--part I/N``) on a store: ``OUT/.clipcond.parts`` holds its plan and N from its first
    part's start until its last part publishes. Parts encode without the store lock; while they run they
    hold this file shared. Parts join under the store lock, and only parts of the same plan and N may join;
    gc and runs of another plan are refused while a parts job is pending (they would reuse the shard
    numbers its parts write, or delete their finished shards)."""

    NAME = StoreFiles.PARTS

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd = folder, folder / self.NAME, None

    def join(self, plan: str, parts: int) -> None:
        """Record the job (if it is the first part) and hold the file shared; the caller holds the store lock."""
        try:
            import fcntl
        except ImportError:
            return
        job = f"{plan} {parts}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            pending = os.pread(fd, 200, 0).decode(errors="replace")
            if pending and pending != job:
                mine = f"this part has plan {plan} of {parts} parts"
                raise ValueError(self._refusal(self.folder, pending, mine, self._running(fd)))
            if not pending:
                os.pwrite(fd, job.encode(), 0)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as err:  # e.g. no locks on this filesystem: parts run without the guard
            os.close(fd)
            logger.warning("%s: cannot hold the parts lock (%s); run gc and other precomputes only after every "
                           "part has finished", self.folder, err)
            return
        except ValueError:
            os.close(fd)
            raise
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @classmethod
    def check(cls, folder: Path, plan: str | None, what: str) -> None:
        """Refuse ``what`` (a run of ``plan``, or gc: None) while a parts job of another plan is pending."""
        try:
            fd = os.open(folder / cls.NAME, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            pending = os.pread(fd, 200, 0).decode(errors="replace")
            running = cls._running(fd)
            if pending and (plan is None or pending.split(" ")[0] != plan or running):
                raise ValueError(cls._refusal(folder, pending, what, running))
        finally:
            os.close(fd)

    @staticmethod
    def _running(fd: int) -> bool:
        """Whether some part holds the file (cannot tell without locks: then assume so)."""
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except (ImportError, OSError):
            return True

    @classmethod
    def finished(cls, folder: Path) -> None:
        """The job's store is published: no parts job is pending any more (the caller holds the store lock)."""
        (folder / cls.NAME).unlink(missing_ok=True)

    @classmethod
    def _refusal(cls, folder: Path, pending: str, what: str, running: bool) -> str:
        plan, _, parts = pending.partition(" ")
        state = "running" if running else "pending: none of its parts is running now"
        return (f"{folder}: a precompute split in {parts} parts (plan {plan}) is {state}; {what}. Finish that job "
                f"(run its missing parts with the same command) or delete {folder}/{cls.NAME} to abandon it")


def try_lock(fd: int) -> bool:
    """Take ``fd``'s exclusive lock if nobody holds it; False where there are no file locks."""
    try:
        import fcntl
    except ImportError:  # no file locks: scan folders are removed only by their own run
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live run (or no locks on this filesystem)
        return False
    return True


def remove_stale_scans(folder: Path, min_age: float = 60.0) -> None:
    """Remove the scan folders in ``folder`` that no live process holds (killed runs'), and folders a run
    was killed while making (older than ``min_age`` seconds)."""
    for path in folder.glob(f"{StoreFiles.SCAN}*"):
        try:
            fd = os.open(path / "lock", os.O_RDWR)
        except FileNotFoundError:  # removed meanwhile by its run (or damaged)
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            if try_lock(fd):
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
    for path in folder.glob(f"{StoreFiles.SCAN_NEW}*"):
        try:
            if time.time() - path.stat().st_mtime > min_age:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            continue
