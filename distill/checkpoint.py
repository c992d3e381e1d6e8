"""Training checkpoints: everything needed to continue a run bit-for-bit, written so that a
bad write or a bad disk never leaves a run without one (issue 21, item 5).

Model, optimizer, queue, RNG states, position (epoch, next batch, global step) and the
resolved config. :func:`save_checkpoint` writes a temp file, fsyncs it, reads it back
against the SHA-256 of the bytes it meant to write, then moves the intact ``last.pt`` to
``prev.pt`` and the new one into place, each sidecar checksum written before its file and
the directory fsync'd after each rename: a process killed at any point leaves the newest
complete checkpoint intact under its own name. :func:`resume_checkpoint` takes the newest
intact one, with one warning line naming a damaged one it passed over. Loaded with
``weights_only=True``.

:class:`RunLock`: one process trains in a run directory at a time (a POSIX lock on
``RUN/.lock``, not inherited by forked workers, dropped by the kernel when the process dies).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch

from ..errors import HgkdError
from ..run_layout import (DAMAGED, LAST, PREV, RUN_LOCK, checkpoint_dir, checkpoint_state,
                          checkpoints_present, checksum_path, file_sha256, recorded_sha256)

__all__ = ["LAST", "PREV", "RunLock", "load_checkpoint", "resume_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state"]  # LAST: re-exported for callers of this module

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- writing ---------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    """Write, flush and fsync ``path``; then drop it from the page cache so a read-back reads the disk."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _write_checksum(checkpoint: Path, digest: str) -> None:
    """``<checkpoint>.sha256`` (``sha256sum`` format), replaced atomically."""
    sidecar = checksum_path(checkpoint)
    tmp = sidecar.with_name(f".{sidecar.name}.tmp")
    _write_synced(tmp, f"{digest}  {checkpoint.name}\n".encode())
    os.replace(tmp, sidecar)


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``RUN/checkpoints/last.pt`` so that a crash at any point leaves an intact newest one.

    Order: temp file (fsync'd, read back against its SHA-256); the intact old ``last.pt``'s
    checksum to ``prev.pt.sha256``, then ``last.pt`` -> ``prev.pt``; the new checksum to
    ``last.pt.sha256``, then temp -> ``last.pt``. A damaged old ``last.pt`` is not rotated
    over a good ``prev.pt``.
    """
    ckpt_dir = checkpoint_dir(run_dir)
    last, prev = ckpt_dir / LAST, ckpt_dir / PREV
    tmp = ckpt_dir / f".{LAST}.tmp"
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_synced(tmp, data)
        if file_sha256(tmp) != digest:
            tmp.unlink()
            raise HgkdError(f"{tmp}: the checkpoint read back differs from the bytes written (a failing disk?); "
                            f"{last} is kept; move --out to another disk and resume with --resume auto")
        old = checkpoint_state(last)
        if old != DAMAGED and last.exists():
            _write_checksum(prev, recorded_sha256(last) or file_sha256(last))
            os.replace(last, prev)
            _fsync_dir(ckpt_dir)
        _write_checksum(last, digest)
        os.replace(tmp, last)
        _fsync_dir(ckpt_dir)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise HgkdError(f"{last}: cannot write the checkpoint ({err.strerror or err}); the newest intact one is "
                        f"kept: free space (or fix --out) and resume with --resume auto") from None
    return last


# ---- reading ---------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HgkdError(f"{path}: no checkpoint there; start without --resume or check --out")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HgkdError(f"{path}: unreadable checkpoint ({type(err).__name__}); it may be truncated") from None


def resume_checkpoint(run_dir: Path, warn: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of ``run_dir`` and its contents; None when it holds none.

    A damaged newer one (checksum differs, or unreadable) is passed over with one warning
    line; when every checkpoint there is damaged, a one-line error (nothing to resume from).
    """
    damaged: list[tuple[Path, str]] = []
    for path in checkpoints_present(run_dir):
        if checkpoint_state(path) == DAMAGED:
            damaged.append((path, f"differs from its checksum {checksum_path(path).name}"))
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            damaged.append((path, f"unreadable: {type(err).__name__}"))
            continue
        if damaged and warn:
            bad, why = damaged[0]
            log.warning("%s is damaged (%s); resuming from %s (epoch %s, step %s)", bad, why, path,
                        payload.get("epoch"), payload.get("global_step"))
        return path, payload
    if damaged:
        names = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise HgkdError(f"{checkpoint_dir(run_dir)}: every checkpoint is damaged ({names}); nothing to resume "
                        f"from: start again with a new --out")
    return None


# ---- one trainer per run directory -------------------------------------------------------
class RunLock:
    """An exclusive, non-blocking POSIX lock (``lockf``) on ``RUN/.lock`` for as long as a process
    trains in RUN (issue 21): a second ``hgkd-distill run`` on the same directory stops with one
    line instead of racing on its checkpoints. A POSIX lock belongs to the process: forked loader
    workers do not inherit it (a ``flock`` they would, keeping it after a killed trainer and
    refusing its restart), and the kernel drops it when the process dies."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise a one-line error naming the process that holds it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise HgkdError(f"{self.path}: cannot create the run's lock file ({err.strerror}); use a writable "
                            f"--out") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            held = err.errno in (errno.EACCES, errno.EAGAIN)
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown" if held else ""
            os.close(fd)
            if held:
                raise HgkdError(f"{self.run_dir} is being trained by process {holder}; wait for it or use another "
                                f"--out") from None
            raise HgkdError(f"{self.path}: cannot lock the run directory ({err.strerror}); use a file system with "
                            f"working POSIX locks (Lustre: mount with flock) or another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
