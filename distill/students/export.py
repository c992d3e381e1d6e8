"""Export a trained student encoder as dense ResNet weights (H-GKD Sec. 3.2.1) for the usual toolboxes.

The sparse encoder's parameters already carry timm's names and shapes (``encoder.body``), and a
dense image is the no-mask case, so the export is the body's state dict: it loads with
``timm.create_model(arch, num_classes=0).load_state_dict(state, strict=True)``. ``FORMATS``:

* ``timm``: safetensors with metadata ``architecture`` (what ``hgkd-evaluate --model`` reads);
* ``torchvision``: the same state dict as a ``torch.save`` file. timm's ResNets use torchvision's
  names, so ``torchvision.models.resnet50().load_state_dict(state, strict=False)`` misses only
  ``fc`` - and mmdetection's ``ResNet`` (``init_cfg=dict(type='Pretrained', checkpoint=...)``)
  reads it as it reads torchvision's ImageNet weights;
* ``detectron2``: the pickle detectron2's checkpointer reads, ``{"model": {name: numpy array},
  "__author__": ..., "matching_heuristics": True}``, with detectron2's ResNet names
  (``stem.conv1``, ``stem.conv1.norm``, ``res2.0.conv1.norm``, ``res2.0.shortcut``, ...): the
  renaming of MoCo's ``detection/convert-pretrain-to-detectron2.py`` (and SparK's
  ``downstream_d2`` converter), BN step counters left out.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...version import __version__
from .encoder import SparseResNetEncoder

FORMAT = "timm"
FORMATS = ("timm", "torchvision", "detectron2")
SUFFIXES = {"timm": ".safetensors", "torchvision": ".pth", "detectron2": ".pkl"}


def export_timm_state_dict(encoder: SparseResNetEncoder) -> dict[str, Tensor]:
    """The timm ResNet state dict (no ``fc``: load into ``num_classes=0``), detached copies."""
    return {key: value.detach().cpu().clone().contiguous() for key, value in encoder.body.state_dict().items()}


def save_safetensors(encoder: SparseResNetEncoder, path: str | Path) -> None:
    """Write the dense timm weights to ``path`` with metadata ``architecture`` (the timm name)."""
    metadata = {"architecture": encoder.arch, "format": FORMAT, "hgkd_version": __version__}
    save_file(export_timm_state_dict(encoder), str(path), metadata=metadata)


def detectron2_name(name: str) -> str:
    """A timm/torchvision ResNet parameter name in detectron2's ResNet (MoCo's conversion)."""
    if not name.startswith("layer"):
        name = "stem." + name  # conv1, bn1
    name = re.sub(r"^layer(\d)", lambda m: f"res{int(m[1]) + 1}", name)
    name = re.sub(r"\bbn(\d)\b", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def save_torchvision(state: dict[str, Tensor], path: str | Path) -> None:
    """The state dict under torchvision's (= timm's) names, ``torch.save``d."""
    torch.save({k: v.contiguous() for k, v in state.items()}, str(path))


def save_detectron2(state: dict[str, Tensor], path: str | Path) -> None:
    """detectron2's pickle: renamed numpy arrays, ``matching_heuristics`` on (MoCo's and SparK's layout)."""
    model = {detectron2_name(k): v.cpu().numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": f"hgkd {__version__}", "matching_heuristics": True}, f)


def save_format(state: dict[str, Tensor], path: str | Path, fmt: str) -> None:
    """Write an exported timm state dict as ``torchvision`` or ``detectron2`` weights."""
    {"torchvision": save_torchvision, "detectron2": save_detectron2}[fmt](state, path)
