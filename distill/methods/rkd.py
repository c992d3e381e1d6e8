"""RKD (Park et al. 2019), Eq. 4-7: distance- and angle-wise relations of embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, register_method


def pairwise_distances(x_bd: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances (B, B) with an exact zero diagonal."""
    sq = x_bd.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * x_bd @ x_bd.T).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(x_bd), device=x_bd.device, dtype=x_bd.dtype))


def rkd_distance(student_bd: Tensor, teacher_bd: Tensor) -> Tensor:
    """Huber loss between distance matrices, each divided by its mean off-diagonal distance."""
    with torch.no_grad():
        t_d = pairwise_distances(teacher_bd)
        t_d = t_d / t_d[t_d > 0].mean()
    s_d = pairwise_distances(student_bd)
    s_d = s_d / s_d[s_d > 0].mean()
    return F.smooth_l1_loss(s_d, t_d)


def triplet_angles(x_bd: Tensor) -> Tensor:
    """cos of the angle at j between e_ij and e_kj for every (i, j, k), flattened."""
    e = F.normalize(x_bd.unsqueeze(0) - x_bd.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).flatten()


def rkd_angle(student_bd: Tensor, teacher_bd: Tensor) -> Tensor:
    with torch.no_grad():
        t_a = triplet_angles(teacher_bd)
    return F.smooth_l1_loss(triplet_angles(student_bd), t_a)


@register_method("rkd")
class RKD(DistillMethod):
    """Penultimate embeddings; weights 25 (distance) and 50 (angle) as in the paper."""

    teacher_needs = frozenset({"embedding"})

    def __init__(self, ctx: MethodContext, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 **base: float) -> None:
        super().__init__(ctx, **base)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        return {"rkd_distance": self.distance_weight * rkd_distance(student.embedding, teacher.embedding),
                "rkd_angle": self.angle_weight * rkd_angle(student.embedding, teacher.embedding)}
