"""The fine-tunes' checkpoint (detection, and image fine-tuning's stop checkpoint): one file, replaced
atomically (fsync'd before the rename, issue 21), checked against the run on resume.

It holds the model and optimizer state, the iteration, every rank's torch RNG state and the
run's config (trunk, data, recipe without ``epochs``, batch, seed, ranks). A resume must match
that config (``epochs`` may grow: the schedule's steps are absolute epochs), so a checkpoint is
never continued with other settings; starting over a checkpoint without ``--resume`` is refused
rather than overwriting it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import HgkdError

FILE = "detection.pt"


@dataclass
class CheckpointFile:
    path: Path

    @classmethod
    def beside(cls, out: str | None, checkpoint_dir: str | None, name: str = FILE) -> "CheckpointFile | None":
        """``checkpoint_dir/<name>``; default ``<out stem>.ckpt/`` beside the record; None without both."""
        folder = checkpoint_dir or default_dir(out)
        return cls(Path(folder) / name) if folder else None

    def load(self, config: dict[str, Any], resume: bool, rank: int) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: start afresh); one line for any mismatch."""
        if not self.path.is_file():
            if resume:
                raise HgkdError(f"--resume: no checkpoint at {self.path} to continue")
            return None
        if not resume:
            raise HgkdError(f"{self.path} holds a {self.path.stem} checkpoint: pass --resume to continue it, or remove it "
                            "to start over")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torn or foreign file
            raise HgkdError(f"--resume {self.path}: unreadable checkpoint ({type(err).__name__})") from None
        saved = state.get("config", {}) if isinstance(state, dict) else {}
        diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff[:4])
            raise HgkdError(f"--resume {self.path}: made with other settings ({shown})")
        if len(state["rng"]) <= rank:
            raise HgkdError(f"--resume {self.path}: made with {len(state['rng'])} ranks")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` next to the file and rename it into place (a crash leaves the old one);
        a full disk or an unwritable folder is one line, the previous checkpoint left as it was."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash never leaves a torn file in place
            os.replace(tmp, self.path)
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself
            finally:
                os.close(folder)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise HgkdError(f"{self.path}: cannot write the checkpoint ({err.strerror or err}); free space or "
                            f"choose --checkpoint-dir") from None


def default_dir(out: str | None) -> str | None:
    """Where a run's checkpoints go by default: ``<out stem>.ckpt/`` beside its record ``out``."""
    return str(Path(out).with_name(Path(out).stem + ".ckpt")) if out else None
