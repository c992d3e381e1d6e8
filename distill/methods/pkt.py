"""PKT (Passalis & Tefas 2018), Eq. 7-10: match conditional probabilities of a cosine kernel."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, register_method


def conditional_probabilities(x_bd: Tensor) -> Tensor:
    """p_{j|i} from the kernel (cos + 1) / 2, each row normalised to sum 1."""
    z = F.normalize(x_bd, dim=1)
    kernel = (z @ z.T + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


def pkt_loss(student_bd: Tensor, teacher_bd: Tensor, eps: float = 1e-7) -> Tensor:
    """KL(P_t || P_s) between the two conditional distributions, mean over all (i, j)."""
    p_s = conditional_probabilities(student_bd)
    p_t = conditional_probabilities(teacher_bd.detach())
    return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()


@register_method("pkt")
class PKT(DistillMethod):
    """Penultimate embeddings; weight 30,000 as in CRD's benchmark of PKT."""

    teacher_needs = frozenset({"embedding"})

    def __init__(self, ctx: MethodContext, weight: float = 30_000.0, **base: float) -> None:
        super().__init__(ctx, **base)
        self.weight = weight

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        return {"pkt": self.weight * pkt_loss(student.embedding, teacher.embedding)}
