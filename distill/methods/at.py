"""AT (Zagoruyko & Komodakis 2017), Eq. 2: spatial attention maps Q = vec(sum_c |A_c|^p),
L2-normalised; L = sum over stage pairs of mean (Q_s - Q_t)^2."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, match_size, pick_stages, register_method


def attention_map(feat_bchw: Tensor, p: float = 2.0, size_hw: tuple[int, int] | None = None) -> Tensor:
    """(B, H*W) normalised attention; the map is resampled to ``size_hw`` before normalising."""
    att_b1hw = feat_bchw.pow(p).mean(1, keepdim=True)
    if size_hw is not None:
        att_b1hw = match_size(att_b1hw, size_hw)
    return F.normalize(att_b1hw.flatten(1), dim=1)


def at_loss(student_bchw: Tensor, teacher_bchw: Tensor, p: float = 2.0) -> Tensor:
    """One stage pair, the teacher's map brought to the student's resolution."""
    size = tuple(student_bchw.shape[-2:])
    return (attention_map(student_bchw, p) - attention_map(teacher_bchw, p, size)).pow(2).mean()


@register_method("at")
class AT(DistillMethod):
    """Stages 1..3 (the hidden ones, as CRD's benchmark), p = 2, weight 1000."""

    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, stages: tuple[int, ...] = (1, 2, 3), p: float = 2.0,
                 weight: float = 1000.0, **base: float) -> None:
        super().__init__(ctx, **base)
        self.stages, self.p, self.weight = tuple(stages), p, weight

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        pairs = zip(pick_stages(student.stages, self.stages, "student"),
                    pick_stages(teacher.stages, self.stages, "teacher"))
        return {"at": self.weight * sum(at_loss(s, t, self.p) for s, t in pairs)}
