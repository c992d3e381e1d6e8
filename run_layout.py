"""The distillation run directory's format, read by distill (writes, resumes, exports) and evaluate.

``RUN/checkpoints/last.pt`` holds ``{"model": state_dict, "config": ..., ...}``; in the model's
state dict the student encoder sits under ``encoder.`` and its dense timm backbone under
``encoder.body.`` (the keys a plain ``timm.create_model(arch, num_classes=0)`` loads).
Torch-free, so any room (and a CLI's ``--help``) may import it.
"""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
RUN_CHECKPOINT = Path(CHECKPOINT_DIR) / LAST  # relative to the run directory
ENCODER_PREFIX = "encoder."  # the student encoder's weights (``hgkd-distill export``)
BACKBONE_PREFIX = ENCODER_PREFIX + "body."  # its dense timm backbone (``hgkd-evaluate --model RUN``)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_DIR


def last_checkpoint(run_dir: str | Path) -> Path:
    """``RUN/checkpoints/last.pt``: the checkpoint a resume, export or evaluation reads."""
    return Path(run_dir) / RUN_CHECKPOINT
