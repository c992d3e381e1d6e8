"""KD (Hinton et al. 2015): L = ce_weight * CE + kd_weight * T^2 KL(p_t^T || p_s^T)."""
from __future__ import annotations

from torch import Tensor

from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, register_method


@register_method("kd")
class KD(DistillMethod):
    """Defaults follow CRD/mdistiller's CIFAR setting: CE 0.1, KD 0.9, T = 4."""

    def __init__(self, ctx: MethodContext, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 kd_temperature: float = 4.0) -> None:
        super().__init__(ctx, ce_weight=ce_weight, kd_weight=kd_weight, kd_temperature=kd_temperature)

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        return {}  # the KD term is the base class's supervised KD term
