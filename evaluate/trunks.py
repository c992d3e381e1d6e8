"""The trunks a detector is fine-tuned from: what ``hgkd-evaluate`` loads, plus a supervised reference.

``--model`` takes what every task takes (``hgkd.evaluate.models.load_student``: an exported
``.safetensors``, a distillation run directory, ``scratch:<arch>``) and, for the "supervised"
row of a COCO transfer table, ``supervised:<arch>:<file>``: a local ImageNet-supervised weight
file of timm or torchvision (``resnet50-0676ba61.pth``, timm's ``model.safetensors`` or
``pytorch_model.bin``; a bare state dict or one under ``state_dict`` / ``model``). timm's ResNets
use torchvision's parameter names, so the file loads into ``timm.create_model(arch,
num_classes=0)`` strictly once its ImageNet classifier (``fc.weight``, ``fc.bias``) is set
aside: every other tensor used, none missing. Nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import HgkdError
from .models import create_backbone, load_student

log = logging.getLogger(__name__)

SUPERVISED = "supervised:"
CLASSIFIER = ("fc.weight", "fc.bias")  # the ImageNet head a detector does not use


def load_trunk(spec: str, seed: int = 0) -> nn.Module:
    """The timm backbone (``num_classes=0``) that ``spec`` names; see the module docstring."""
    if not spec.startswith(SUPERVISED):
        return load_student(spec, seed=seed)
    arch, sep, file = spec[len(SUPERVISED):].partition(":")
    if not arch or not sep or not file:
        raise HgkdError(f"--model {spec}: expected supervised:<timm arch>:<weight file>, "
                        "e.g. supervised:resnet50:resnet50-0676ba61.pth")
    state = {k: v for k, v in read_state_dict(Path(file), spec).items() if k not in CLASSIFIER}
    model = create_backbone(arch, seed)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise HgkdError(f"--model {spec}: weights do not fit timm {arch} "
                        f"({(lines[1] if len(lines) > 1 else lines[0]).strip()})") from None
    log.info("loaded supervised %s from %s (%d tensors)", arch, file, len(state))
    return model


def read_state_dict(file: Path, spec: str) -> dict[str, Tensor]:
    """A state dict from a .safetensors or a torch file (``weights_only``), unwrapped."""
    if not file.is_file():
        raise HgkdError(f"--model {spec}: no such weight file {file}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors header: all mean "not a weight file"
        raise HgkdError(f"--model {spec}: unreadable weight file ({type(err).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise HgkdError(f"--model {spec}: not a state dict of tensors")
    return state
