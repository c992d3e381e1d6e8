"""HSAKD (Yang et al. 2021/2022, "Hierarchical Self-supervised Augmented Knowledge Distillation").

Self-supervision augmented task: every image in four rotations r = 0, 90, 180, 270 degrees,
joint label ``4 * y + r`` over 4K classes. Auxiliary branches after each stage of teacher and
student predict the joint label. The teacher is trained first with its branches
(``hgkd-distill teacher --branches``: CE on the unrotated copies + joint CE on every branch);
the student then minimises, over all rotated copies,
  CE(logits of the unrotated copies, y) + sum_l KL_T(branch_s_l, branch_t_l) + KL_T(logits_s, logits_t)
with KL_T = T^2 KL(softmax(t/T) || softmax(s/T)) and T = 3.
Batches are interleaved: sample i's rotations are rows 4i .. 4i+3 (HSAKD's layout). The
rotations, joint labels and branches live in ``distill/rotation_task.py``, shared with the
classifier teacher that carries its own branches (this method's ``teacher_needs``).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ...errors import HgkdError
from ..outputs import NetOutputs
from ..rotation_task import make_branches, rotate_batch, unrotated
from .base import DistillMethod, MethodContext, kd_loss, register_method


@register_method("hsakd")
class HSAKD(DistillMethod):
    """Offline HSAKD: the student carries its own branches (this method's modules)."""

    teacher_needs = frozenset({"logits", "branch_logits"})  # a teacher trained with --branches

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
