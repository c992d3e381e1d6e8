"""HSAKD's self-supervised augmented task (Yang et al. 2021/2022): four rotations, joint labels
``4 * y + r`` over 4K classes, and the auxiliary branches that predict them after each stage.

Shared by the classifier networks (a teacher trained with ``hgkd-distill teacher --branches``
carries branches; :class:`~hgkd.distill.classifier.ClassifierNet`) and by the ``hsakd``
method (the student's branches), so neither side imports the other. Batches are interleaved:
sample i's rotations are rows 4i .. 4i+3 (HSAKD's layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import HgkdError

ROTATIONS = 4


def rotate_batch(images_bchw: Tensor) -> Tensor:
    """(4B, C, H, W): each image followed by its 90/180/270-degree rotations."""
    if images_bchw.shape[-1] != images_bchw.shape[-2]:
        raise HgkdError("HSAKD's rotations need square images (--img-size)")
    rotated = [torch.rot90(images_bchw, k, dims=(2, 3)) for k in range(ROTATIONS)]
    return torch.stack(rotated, dim=1).flatten(0, 1)


def joint_labels(labels_b: Tensor) -> Tensor:
    """(4B,) joint labels ``4 * y + r`` in :func:`rotate_batch`'s row order."""
    rotation = torch.arange(ROTATIONS, device=labels_b.device)
    return (labels_b.unsqueeze(1) * ROTATIONS + rotation).flatten()


def unrotated(x_b4: Tensor) -> Tensor:
    """Rows of the original (0-degree) copies."""
    return x_b4[0::ROTATIONS]


class AuxiliaryBranch(nn.Module):
    """Stage features -> joint-label logits: two conv-BN-ReLU (the first strided while the
    map is larger than 4x4), global average pooling, a linear classifier. A lighter stand-in
    for HSAKD's branches, which copy the network's remaining stages (a documented choice)."""

    def __init__(self, in_ch: int, num_outputs: int, width: int | None = None) -> None:
        super().__init__()
        width = width or max(in_ch, 128)
        self.convs = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(width, num_outputs)

    def forward(self, feat_bchw: Tensor) -> Tensor:
        if min(feat_bchw.shape[-2:]) > 4:
            feat_bchw = F.avg_pool2d(feat_bchw, 2)
        return self.fc(self.convs(feat_bchw).mean((2, 3)))


def make_branches(stage_channels: tuple[int, ...], num_classes: int) -> nn.ModuleList:
    return nn.ModuleList(AuxiliaryBranch(c, ROTATIONS * num_classes) for c in stage_channels)
