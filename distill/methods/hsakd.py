"""HSAKD (Yang et al. 2021/2022, "Hierarchical Self-supervised Augmented Knowledge Distillation").

Self-supervision augmented task: every image in four rotations r = 0, 90, 180, 270 degrees,
joint label ``4 * y + r`` over 4K classes. Auxiliary branches after each stage of teacher and
student predict the joint label. The teacher is trained first with its branches
(``hgkd-distill teacher --branches``: CE on the unrotated copies + joint CE on every branch);
the student then minimises, over all rotated copies,
  CE(logits of the unrotated copies, y) + sum_l KL_T(branch_s_l, branch_t_l) + KL_T(logits_s, logits_t)
with KL_T = T^2 KL(softmax(t/T) || softmax(s/T)) and T = 3.
Batches are interleaved: sample i's rotations are rows 4i .. 4i+3 (HSAKD's layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import HgkdError
from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, kd_loss, register_method

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


@register_method("hsakd")
class HSAKD(DistillMethod):
    """Offline HSAKD: the student carries its own branches (this method's modules)."""

    teacher_needs = frozenset({"logits", "branch_logits"})

    def __init__(self, ctx: MethodContext, temperature: float = 3.0, ce_weight: float = 1.0) -> None:
        super().__init__(ctx, ce_weight=ce_weight)
        self.temperature = temperature
        self.branches = make_branches(ctx.student.stage_channels, ctx.student.num_classes)

    def prepare(self, images_bchw: Tensor, labels_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return rotate_batch(images_bchw), labels_b

    def forward(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                index_b: Tensor | None) -> dict[str, Tensor]:
        teacher = teacher.detach()
        if len(teacher.branch_logits) != len(self.branches):
            raise HgkdError(f"hsakd needs a teacher with {len(self.branches)} auxiliary branches (it has "
                            f"{len(teacher.branch_logits)}); train it with 'hgkd-distill teacher --branches'")
        t = self.temperature
        branch_kl = sum(kd_loss(branch(feat), t_logits, t)
                        for branch, feat, t_logits in zip(self.branches, student.stages, teacher.branch_logits))
        terms = {"ce": self.ce_weight * F.cross_entropy(unrotated(student.logits), labels_b),
                 "branch_kl": branch_kl,
                 "logit_kl": kd_loss(student.logits, teacher.logits, t)}
        terms["loss"] = terms["ce"] + terms["branch_kl"] + terms["logit_kl"]
        return terms
