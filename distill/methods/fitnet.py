"""FitNet (Romero et al. 2015), Eq. 3: a regressor maps the student's hint-layer features to
the teacher's; L = || r(s) - t ||^2 (mean)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..outputs import NetOutputs
from .base import DistillMethod, MethodContext, match_size, register_method


def conv_regressor(in_ch: int, out_ch: int) -> nn.Module:
    """1x1 conv + BN. CRD's ConvReg ends in a ReLU, which suits post-ReLU CNN teachers but
    cannot match a ViT's signed token features; this regressor can match both."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))


@register_method("fitnet")
class FitNet(DistillMethod):
    """Hint on stage ``stage`` (default 2: stride 16, a ViT/16's grid); weight 100 as in CRD.

    The student map is resampled to the teacher's resolution when they differ.
    """

    teacher_needs = frozenset({"stages"})

    def __init__(self, ctx: MethodContext, stage: int = 2, teacher_stage: int | None = None,
                 weight: float = 100.0, **base: float) -> None:
        super().__init__(ctx, **base)
        self.stage, self.teacher_stage = stage, stage if teacher_stage is None else teacher_stage
        self.weight = weight
        self.regressor = conv_regressor(ctx.student.stage_channels[stage], ctx.teacher.stage_channels[self.teacher_stage])

    def distill_terms(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None,
                      index_b: Tensor | None) -> dict[str, Tensor]:
        target_bchw = teacher.stages[self.teacher_stage]
        hint_bchw = match_size(self.regressor(student.stages[self.stage]), target_bchw.shape[-2:])
        return {"fitnet": self.weight * F.mse_loss(hint_bchw, target_bchw)}
