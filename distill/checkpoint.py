"""Training checkpoints: everything needed to continue a run bit-for-bit.

Model, optimizer, queue, RNG states, position (epoch, next batch, global step) and the
resolved config; written atomically (temp file + rename) so a crash never leaves a torn
checkpoint. Loaded with ``weights_only=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import HgkdError
from ..run_layout import LAST, checkpoint_dir  # LAST: re-exported for callers of this module


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, payload: dict[str, Any], name: str = LAST) -> Path:
    ckpt_dir = checkpoint_dir(run_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{name}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, ckpt_dir / name)
    return ckpt_dir / name


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HgkdError(f"{path}: no checkpoint there; start without --resume or check --out")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HgkdError(f"{path}: unreadable checkpoint ({type(err).__name__}); it may be truncated") from None
