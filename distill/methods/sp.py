"""SP (Tung & Mori 2019), Eq. 2-4: similarity-preserving KD.

G = row-L2-normalised (f f^T) of each batch's flattened activations; L = ||G_s - G_t||_F^2 / b^2.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, pick_stages, register_method


def similarity_matrix(feat: Tensor) -> Tensor:
    flat_bd = feat.flatten(1)
    return F.normalize(flat_bd @ flat_bd.T, dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    batch = student_feat.shape[0]
    return (similarity_matrix(student_feat) - similarity_matrix(teacher_feat)).pow(2).sum() / batch**2


@register_method("sp")
class SP(DistillMethod):
    """Last stage (before pooling), weight 3000 as in CRD's benchmark."""

    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, stages: tuple[int, ...] = (-1,), weight: float = 3000.0,
                 **base: float) -> None:
        super().__init__(ctx, **base)
        self.stages, self.weight = tuple(stages), weight

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        pairs = zip(pick_stages(student.stages, self.stages, "student"),
                    pick_stages(teacher.stages, self.stages, "teacher"))
        return {"sp": self.weight * sum(sp_loss(s, t) for s, t in pairs)}
