"""CRD (Tian et al. 2020), Eq. 10-18: contrastive representation distillation with memory banks.

Student and teacher embeddings are linearly projected to ``feat_dim`` and L2-normalised.
Two banks hold one normalised embedding per training image (student's v1, teacher's v2).
For each sample, its own index is the positive and K indices drawn uniformly are negatives:
  P(i | v) = exp(v . m_i / T) / Z      (Z estimated once, on the first batch, as mean * N)
  h = P / (P + K / N);   L = -E[log h(pos)] - K E[log (1 - h(neg))]
in both directions (student embedding vs teacher bank, teacher embedding vs student bank).
After the loss the banks move to ``normalize(m * bank[i] + (1 - m) * v_i)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import HgkdError
from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, register_method


def nce_loss(probs_bk1: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss; column 0 holds the positive's (Z-normalised) probability."""
    k = probs_bk1.shape[1] - 1
    noise = k / num_samples
    log_pos = (probs_bk1[:, 0] / (probs_bk1[:, 0] + noise + eps)).log()
    log_neg = (noise / (probs_bk1[:, 1:] + noise + eps)).log()
    return -(log_pos.sum() + log_neg.sum()) / probs_bk1.shape[0]


class ContrastMemory(nn.Module):
    """The two memory banks, their normalising constants and the momentum update."""

    def __init__(self, feat_dim: int, num_samples: int, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        self.num_samples, self.temperature, self.momentum = num_samples, temperature, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("bank_student", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("bank_teacher", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))

    def probabilities(self, v_bd: Tensor, bank: Tensor, idx_bk1: Tensor, z: Tensor) -> Tensor:
        """exp(v . bank[idx] / T) / Z; Z is set from the first batch and then kept."""
        weights_bkd = bank[idx_bk1].detach()
        out = torch.exp(torch.bmm(weights_bkd, v_bd.unsqueeze(2)).squeeze(2) / self.temperature)
        if z < 0:
            z.fill_(float(out.mean().detach() * self.num_samples))
        return out / z

    @torch.no_grad()
    def update(self, v_s_bd: Tensor, v_t_bd: Tensor, index_b: Tensor) -> None:
        for bank, v in ((self.bank_student, v_s_bd), (self.bank_teacher, v_t_bd)):
            mixed = bank[index_b] * self.momentum + v.detach() * (1 - self.momentum)
            bank[index_b] = F.normalize(mixed, dim=1)


@register_method("crd")
class CRD(DistillMethod):
    """Defaults of the CRD code: feat_dim 128, K 16,384, T 0.07, momentum 0.5, weight 0.8."""

    teacher_needs = frozenset({"embedding"})

    def __init__(self, ctx: MethodContext, feat_dim: int = 128, negatives: int = 16_384,
                 temperature: float = 0.07, momentum: float = 0.5, weight: float = 0.8, **base: float) -> None:
        super().__init__(ctx, **base)
        if ctx.num_samples < 2:
            raise HgkdError("crd needs the number of training images for its memory bank")
        self.embed_s = nn.Linear(ctx.student.embed_dim, feat_dim)
        self.embed_t = nn.Linear(ctx.teacher.embed_dim, feat_dim)
        self.memory = ContrastMemory(feat_dim, ctx.num_samples, temperature, momentum)
        self.negatives, self.weight = negatives, weight

    def contrast_indices(self, index_b: Tensor) -> Tensor:
        """(B, K+1): the positive, then K uniformly drawn instances (with replacement)."""
        negatives = torch.randint(0, self.memory.num_samples, (len(index_b), self.negatives), device=index_b.device)
        return torch.cat([index_b.unsqueeze(1), negatives], dim=1)

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        v_s = F.normalize(self.embed_s(student.embedding), dim=1)
        v_t = F.normalize(self.embed_t(teacher.embedding.detach()), dim=1)
        idx = self.contrast_indices(index_b)
        mem = self.memory
        p_t_vs_student_bank = mem.probabilities(v_t, mem.bank_student, idx, mem.z_student)
        p_s_vs_teacher_bank = mem.probabilities(v_s, mem.bank_teacher, idx, mem.z_teacher)
        loss = nce_loss(p_s_vs_teacher_bank, mem.num_samples) + nce_loss(p_t_vs_student_bank, mem.num_samples)
        mem.update(v_s, v_t, index_b)
        return {"crd": self.weight * loss}
