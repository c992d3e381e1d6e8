"""Classifier networks for the supervised baselines: a backbone, a linear head and, for HSAKD,
auxiliary branches. Used as the (frozen) classifier teacher and as the baseline student.

Backbones, looked up by name in the existing registries (no third registry):
- a student encoder name (``resnet18/34/50``): the timm ResNet, stages = its four stage
  outputs, embedding = global average pool of the last (keys ``encoder.body.*``, so
  ``hgkd-distill export`` and ``hgkd-evaluate`` read a baseline run like an H-GKD run);
- a teacher name (``mae_vit_*``, ``beit_*``, ``cae_*``): the MIM ViT (optionally started from
  its official MIM checkpoint, i.e. MAE-style fine-tuning), stages = patch-token grids after
  each quarter of the blocks, embedding = LayerNorm of the mean patch token (MAE's
  global-pool fine-tuning head).
``forward_outputs(images)`` returns :class:`NetOutputs` (logits, embedding, stages, branches).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from ..errors import HgkdError
from ..pixels import normalize_uint8, pixel_stats
from ..run_layout import final_checkpoint
from ..extract.teachers import TEACHERS, create_teacher
from .methods.base import NetDims
from .outputs import NetOutputs
from .rotation_task import make_branches
from .students import STUDENT_ENCODERS, SparseResNetEncoder

FORMAT = "hgkd-classifier-1"


class ResNetBackbone(SparseResNetEncoder):
    """The student encoder run dense on whole images (``body`` = the timm ResNet)."""

    def __init__(self, arch: str) -> None:
        super().__init__(arch, backend="dense")
        self.stage_channels = tuple(self.channels)
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    def forward(self, images_bchw: Tensor) -> tuple[list[Tensor], Tensor]:  # type: ignore[override]
        stages = [feat for feat, _ in self._forward_dense(images_bchw)]
        return stages, stages[-1].mean((2, 3))


class ViTBackbone(nn.Module):
    """A registered MIM teacher, trainable, read at four depths through forward hooks."""

    def __init__(self, arch: str, img_size: int, checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.vit = create_teacher(arch, checkpoint=checkpoint, img_size=img_size).requires_grad_(True)
        self.vit.train()
        blocks = getattr(self.vit, "blocks", None)
        blocks = blocks if blocks is not None else self.vit.encoder.blocks
        depth = len(blocks)
        self._taps = [blocks[max(0, round(depth * q / 4) - 1)] for q in (1, 2, 3, 4)]
        self.stage_channels = (self.vit.embed_dim,) * 4
        self.fc_norm = nn.LayerNorm(self.vit.embed_dim)
        self.mean, self.std = self.vit.mean, self.vit.std

    def forward(self, images_bchw: Tensor) -> tuple[list[Tensor], Tensor]:
        grabbed: list[Tensor] = []
        hooks = [tap.register_forward_hook(lambda _m, _i, out: grabbed.append(out)) for tap in self._taps]
        try:
            tokens_bnc, _ = self.vit.forward_masked(images_bchw, None)
        finally:
            for hook in hooks:
                hook.remove()
        h, w = self.vit.grid_size
        stages = [t[:, -h * w:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in grabbed]
        return stages, self.fc_norm(tokens_bnc.mean(1))


class ClassifierNet(nn.Module):
    """``encoder`` + linear ``head`` (+ one HSAKD branch per stage predicting 4K joint labels).

    A ResNet's weights sit at ``encoder.body.*`` as in an H-GKD student, so the same export
    and evaluation read both.
    """

    def __init__(self, arch: str, num_classes: int, img_size: int = 224, branches: bool = False,
                 init_checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        if arch in STUDENT_ENCODERS:
            if init_checkpoint:
                raise HgkdError(f"--init-checkpoint is for ViT teachers; {arch} starts from random init")
            self.encoder: nn.Module = ResNetBackbone(arch)
        elif arch in TEACHERS:
            self.encoder = ViTBackbone(arch, img_size, init_checkpoint)
        else:
            known = ", ".join(STUDENT_ENCODERS.names() + TEACHERS.names())
            raise HgkdError(f"unknown classifier architecture {arch!r}; choose one of: {known}")
        if num_classes < 2:
            raise HgkdError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.arch, self.num_classes, self.img_size = arch, num_classes, img_size
        self.dims = NetDims(tuple(self.encoder.stage_channels), self.encoder.stage_channels[-1], num_classes)
        self.head = nn.Linear(self.dims.embed_dim, num_classes)
        self.branches = make_branches(self.dims.stage_channels, num_classes) if branches else None
        # uint8-range normalisation constants; not persistent, so saved files hold weights only
        pixel_mean, pixel_std = pixel_stats(self.mean, self.std)
        self.register_buffer("pixel_mean", pixel_mean, persistent=False)
        self.register_buffer("pixel_std", pixel_std, persistent=False)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.encoder.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.encoder.std)

    def normalise(self, images_bchw: Tensor) -> Tensor:
        """uint8-valued images -> the input this net expects (its encoder's mean/std)."""
        return normalize_uint8(images_bchw, self.pixel_mean, self.pixel_std)

    def forward_outputs(self, images_bchw: Tensor, visible_bhw: Tensor | None = None) -> NetOutputs:
        stages, embedding_bd = self.encoder(images_bchw)
        branch_logits = [b(s) for b, s in zip(self.branches, stages)] if self.branches is not None else []
        return NetOutputs(logits=self.head(embedding_bd), embedding=embedding_bd, stages=stages,
                          branch_logits=branch_logits)

    def forward(self, images_bchw: Tensor) -> Tensor:
        return self.forward_outputs(images_bchw).logits

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes, "img_size": self.img_size,
                "branches": self.branches is not None}


def save_classifier(net: ClassifierNet, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Atomic write of weights + what rebuilds the net (plain types: loads with weights_only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, **net.describe(), "extra": extra or {}, "model": net.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_classifier(path: str | os.PathLike) -> tuple[ClassifierNet, dict[str, Any]]:
    """A classifier written by :func:`save_classifier`; returns (net in eval mode, extra info)."""
    path = Path(path)
    if not path.is_file():
        raise HgkdError(f"--teacher-classifier {path}: no such file; train one with 'hgkd-distill teacher'")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise HgkdError(f"--teacher-classifier {path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise HgkdError(f"--teacher-classifier {path}: not a classifier written by 'hgkd-distill teacher'")
    net = ClassifierNet(blob["arch"], blob["num_classes"], blob["img_size"], blob["branches"])
    net.load_state_dict(blob["model"])
    return net.eval(), blob["extra"]


def load_run_classifier(run_dir: Path, img_size: int) -> ClassifierNet:
    """The classifier student of a supervised-baseline run (its last checkpoint), in eval mode;
    ``img_size`` is the teacher's (the student trained on the same views)."""
    from .checkpoint import load_checkpoint
    from .config import DistillConfig

    ckpt = load_checkpoint(final_checkpoint(run_dir))
    cfg = DistillConfig.from_dict(ckpt["config"], source=str(run_dir))
    if "head.weight" not in ckpt["model"]:
        raise HgkdError(f"{run_dir}: not a supervised-baseline run (no classifier head)")
    net = ClassifierNet(cfg.student, int(ckpt["model"]["head.weight"].shape[0]), img_size)
    net.load_state_dict(ckpt["model"])
    return net.eval()
