"""Students as plain dense timm models: exported weights, a run directory, or random init.

``--model`` accepts three things, all giving ``timm.create_model(arch, num_classes=0)`` in
eval mode (the penultimate, globally pooled features are the model's output):

* ``student.safetensors`` written by ``hgkd-distill export`` (metadata ``architecture``);
* a distillation run directory ``RUN`` (or its ``RUN/checkpoints/last.pt``): the encoder is
  the checkpoint's ``encoder.body.*`` entries, the architecture ``config["student"]``;
* ``scratch:<arch>``: a randomly initialised timm model (seeded), the no-distillation floor.

This room reads checkpoints as files; it never imports ``hgkd.distill``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from ..devices import resolve_device
from ..errors import HgkdError
from ..run_layout import BACKBONE_PREFIX, RUN_CHECKPOINT, refuse_damaged

log = logging.getLogger(__name__)

SCRATCH = "scratch:"


def create_backbone(arch: str, seed: int = 0) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)``, initialised from ``seed`` without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=0)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise HgkdError(f"unknown timm architecture {arch!r} ({err})") from None
    return model.eval()


def load_student(path: str, arch: str | None = None, seed: int = 0) -> nn.Module:
    """A dense timm backbone (``num_classes=0``, eval mode) from ``path`` (see module docstring).

    ``arch``, when given, must agree with the architecture the file records; ``seed`` only
    matters for ``scratch:<arch>``.
    """
    spec = str(path)
    if spec.startswith(SCRATCH):
        name = spec[len(SCRATCH):]
        if not name or (arch and arch != name):
            raise HgkdError(f"--model {spec}: expected scratch:<timm arch>{f' (scratch:{arch})' if arch else ''}")
        return create_backbone(name, seed)
    file = Path(spec)
    if file.is_dir():
        file = file / RUN_CHECKPOINT
        if not file.is_file():
            raise HgkdError(f"--model {spec}: a run directory needs {RUN_CHECKPOINT}; it is not there")
    elif not file.is_file():
        raise HgkdError(f"--model {spec}: no such file or directory (give a .safetensors, a run directory "
                        "or scratch:<arch>)")
    refuse_damaged(file, f"--model {spec}: ")  # a run's checkpoint whose sha256 sidecar disagrees (issue 21)
    if file.suffix == ".safetensors":
        state, recorded = _read_safetensors(file)
    else:
        state, recorded = _read_run_checkpoint(file)
    arch = _agree(spec, arch, recorded)
    model = create_backbone(arch, seed)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise HgkdError(f"--model {spec}: weights do not fit timm {arch} ({first})") from None
    log.info("loaded %s (%s, %d tensors)", spec, arch, len(state))
    return model


def _agree(spec: str, wanted: str | None, recorded: str | None) -> str:
    if wanted and recorded and wanted != recorded:
        raise HgkdError(f"--model {spec}: holds a {recorded}, not the requested {wanted}")
    arch = wanted or recorded
    if not arch:
        raise HgkdError(f"--model {spec}: records no architecture; pass the timm name explicitly")
    return arch


def _read_safetensors(file: Path) -> tuple[dict[str, Tensor], str | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise HgkdError(f"--model {file}: unreadable safetensors file ({err})") from None
    if not state:
        raise HgkdError(f"--model {file}: holds no tensors")
    return state, metadata.get("architecture")


def _read_run_checkpoint(file: Path) -> tuple[dict[str, Tensor], str | None]:
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "not a usable checkpoint"
        raise HgkdError(f"--model {file}: unreadable checkpoint ({type(err).__name__}); "
                        "give an exported .safetensors or a run directory") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise HgkdError(f"--model {file}: not a distillation checkpoint (no 'model' state dict)")
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(BACKBONE_PREFIX)}
    if not state:
        raise HgkdError(f"--model {file}: checkpoint holds no student encoder weights ({BACKBONE_PREFIX}*)")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return state, config.get("student")
