"""Preemption: SIGTERM and SIGUSR1 ask a long run to stop at its next step boundary (issue 21).

A cluster ends a job with SIGTERM and a kill after a grace period (SLURM can send SIGUSR1
ahead of time with ``--signal=USR1@120``). Inside ``stop_signals()`` those signals only set
a flag; the training loop polls ``StopSignals.requested`` after each step, checkpoints, and
raises ``Resumable``. ``errors.user_errors`` turns that into one line and exit code
``RESUMABLE_EXIT``, so a wrapper script (or ``sbatch --requeue``) knows the same command
continues the run.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import RESUMABLE_EXIT, Resumable

__all__ = ["RESUMABLE_EXIT", "Resumable", "StopSignals", "stop_signals", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """The name of the first stop signal received (``None`` until one arrives)."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def _handle(self, signum: int, _frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def request(self, name: str = "request") -> None:
        """Ask for a stop from code (tests, or a rank told by another rank)."""
        if self.requested is None:
            self.requested = name


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Catch SIGTERM/SIGUSR1 as a stop request for the duration; previous handlers restored after.

    Off the main thread (where Python cannot install handlers) the flag simply never sets.
    """
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop._handle) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():  # None: a handler set outside Python, not restorable
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
