"""ICD (Giakoumoglou & Stathaki, "Invariant Consistency for Knowledge Distillation"; later DCD).

z_s, z_t: penultimate features through their own linear projections to ``dim``, L2-normalised.
  logits = (z_s z_t^T) * clamp(exp(tau), 0, max_scale) + b        (learnable tau, b)
  L_con  = CE(logits, diag)                                       (instance discrimination)
  L_inv  = KL(softmax(logits, dim=0)^T || softmax(logits, dim=1))  (invariance penalty)
  L_ICD  = L_con + alpha * L_inv;  total = CE(y) + kd_weight * KD + beta * L_ICD
(method notes; tau0 = 1, b0 = 0, max_scale = 10, alpha = 0.5; beta and the KD weight are
options — ``kd_weight=1`` is ICD+KD).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import HgkdError
from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, register_method


class InvariantConsistency(nn.Module):
    """The ICD objective on already projected, normalised embeddings."""

    def __init__(self, tau_init: float = 1.0, bias_init: float = 0.0, max_scale: float = 10.0,
                 alpha: float = 0.5) -> None:
        super().__init__()
        self.tau = nn.Parameter(torch.tensor(float(tau_init)))
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))
        self.max_scale, self.alpha = max_scale, alpha

    def logits(self, z_s_bd: Tensor, z_t_bd: Tensor) -> Tensor:
        scale = torch.clamp(self.tau.exp(), 0.0, self.max_scale)
        return z_s_bd @ z_t_bd.T * scale + self.bias

    def forward(self, z_s_bd: Tensor, z_t_bd: Tensor) -> tuple[Tensor, Tensor]:
        """(L_con, L_inv)."""
        logits_bb = self.logits(z_s_bd, z_t_bd)
        target = torch.arange(len(logits_bb), device=logits_bb.device)
        contrast = F.cross_entropy(logits_bb, target)
        log_cols_t = F.log_softmax(logits_bb, dim=0).T  # row i: softmax over the column i
        log_rows = F.log_softmax(logits_bb, dim=1)
        invariance = F.kl_div(log_rows, log_cols_t, reduction="batchmean", log_target=True)
        return contrast, invariance


@register_method("icd")
class ICD(DistillMethod):
    teacher_needs = frozenset({"embedding"})

    def __init__(self, ctx: MethodContext, dim: int = 128, tau_init: float = 1.0, bias_init: float = 0.0,
                 max_scale: float = 10.0, alpha: float = 0.5, beta: float = 1.0, **base: float) -> None:
        if not 0 < max_scale or not math.isfinite(max_scale):
            raise HgkdError(f"--method-opt max_scale={max_scale}: must be a positive number")
        super().__init__(ctx, **base)
        self.embed_s = nn.Linear(ctx.student.embed_dim, dim)
        self.embed_t = nn.Linear(ctx.teacher.embed_dim, dim)
        self.objective = InvariantConsistency(tau_init, bias_init, max_scale, alpha)
        self.beta = beta

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        z_s = F.normalize(self.embed_s(student.embedding), dim=1)
        z_t = F.normalize(self.embed_t(teacher.embedding.detach()), dim=1)
        contrast, invariance = self.objective(z_s, z_t)
        return {"icd_con": self.beta * contrast, "icd_inv": self.beta * self.objective.alpha * invariance}
