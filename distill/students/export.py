"""Export a trained student encoder as dense timm ResNet weights (H-GKD Sec. 3.2.1).

The sparse encoder's parameters already carry timm's names and shapes (``encoder.body``), and a
dense image is the no-mask case, so the export is the body's state dict: it loads with
``timm.create_model(arch, num_classes=0).load_state_dict(state, strict=True)``.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ...version import __version__
from .encoder import SparseResNetEncoder

FORMAT = "timm"


def export_timm_state_dict(encoder: SparseResNetEncoder) -> dict[str, Tensor]:
    """The timm ResNet state dict (no ``fc``: load into ``num_classes=0``), detached copies."""
    return {key: value.detach().cpu().clone().contiguous() for key, value in encoder.body.state_dict().items()}


def save_safetensors(encoder: SparseResNetEncoder, path: str | Path) -> None:
    """Write the dense timm weights to ``path`` with metadata ``architecture`` (the timm name)."""
    metadata = {"architecture": encoder.arch, "format": FORMAT, "hgkd_version": __version__}
    save_file(export_timm_state_dict(encoder), str(path), metadata=metadata)
