"""Shard ownership: at most one live writer per cache shard, enforced by the OS.

Two writers on one Zarr shard silently lose views (measured: shared/notes/cache-storage.md),
so a writer must hold an exclusive ``flock`` on the shard's lock file (in ``<cache>.locks/``) for as long as it
writes. The kernel drops the lock when the process dies (also on ``kill -9``), so a crashed
writer never blocks a resume. Works on local file systems; remote stores are written with
disjoint ``--rank``/``--world-size`` shard sets instead.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator



def lock_dir(cache_dir: Path | str) -> Path:
    """``<cache>.locks/`` beside the cache, so the Zarr hierarchy holds only Zarr nodes."""
    cache_dir = Path(cache_dir)
    return cache_dir.with_name(cache_dir.name + ".locks")


class ShardLock:
    """An exclusive, non-blocking lock on one shard of one cache."""

    def __init__(self, cache_dir: Path, shard: int) -> None:
        self.path = lock_dir(cache_dir) / f"shard-{shard:06d}.lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if no live process holds it; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def creation_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise cache creation/opening between processes started at the same moment."""
    locks = lock_dir(cache_dir)
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / "create.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
