"""DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher"), Eq. 5-8.

With Y = softmax(logits / tau): inter = 1 - pearson over classes per sample, intra =
1 - pearson over the batch per class; L = beta * tau^2 * inter + gamma * tau^2 * intra.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..losses import pearson
from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, register_method


def dist_loss(student_logits_bk: Tensor, teacher_logits_bk: Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """(beta-weighted inter-class term, gamma-weighted intra-class term)."""
    y_s = F.softmax(student_logits_bk / tau, dim=1)
    y_t = F.softmax(teacher_logits_bk / tau, dim=1)
    inter = (1.0 - pearson(y_s, y_t)).mean()
    intra = (1.0 - pearson(y_s.T, y_t.T)).mean()
    return beta * tau**2 * inter, gamma * tau**2 * intra


@register_method("dist")
class DIST(DistillMethod):
    """Defaults: the paper's ImageNet setting (beta = gamma = 1, tau = 1) plus CE."""

    def __init__(self, ctx: MethodContext, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0,
                 **base: float) -> None:
        super().__init__(ctx, **base)
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        inter, intra = dist_loss(student.logits, teacher.logits, self.beta, self.gamma, self.tau)
        return {"inter": inter, "intra": intra}
