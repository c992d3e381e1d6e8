"""``hgkd-distill export``: a run directory's student encoder as dense timm ResNet weights.

The sparse encoder's parameters already carry timm's names and shapes (a dense image is the
no-mask case), so export is the encoder's state dict, checked against its config.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import HgkdError
from ..run_layout import ENCODER_PREFIX, final_checkpoint
from .checkpoint import load_checkpoint
from .config import DistillConfig
from .students import create_encoder
from .students.export import save_safetensors


def export_run(run_dir: Path, out: Path) -> str:
    """Write ``out`` (safetensors) from ``run_dir``'s last checkpoint; returns the timm arch name."""
    ckpt = load_checkpoint(final_checkpoint(run_dir))
    cfg = DistillConfig.from_dict(ckpt["config"], source=str(run_dir))
    encoder = create_encoder(cfg.student, backend="masked")  # backend does not change the weights
    state = {k[len(ENCODER_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(ENCODER_PREFIX)}
    if not state:
        raise HgkdError(f"{run_dir}: checkpoint holds no student encoder weights")
    encoder.load_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(encoder, out)
    return cfg.student
