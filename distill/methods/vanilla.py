"""No distillation: the student trained on labels alone (CE). The floor of every KD table."""
from __future__ import annotations

from torch import Tensor

from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, register_method


@register_method("vanilla")
class Vanilla(DistillMethod):
    """CE only; the teacher never runs (it only fixes the class count)."""

    teacher_needs = frozenset()

    def __init__(self, ctx: MethodContext, ce_weight: float = 1.0) -> None:
        super().__init__(ctx, ce_weight=ce_weight)

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        return {}
