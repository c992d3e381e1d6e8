"""What a network hands to a distillation loss: one record for students and teachers alike.

Each field is optional; a method states which teacher fields it needs
(:attr:`hgkd.distill.methods.base.DistillMethod.teacher_needs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor


@dataclass
class NetOutputs:
    logits: Tensor | None = None  # (B, K) class scores
    embedding: Tensor | None = None  # (B, D) penultimate, globally pooled features
    stages: list[Tensor] = field(default_factory=list)  # hidden feature maps, shallow to deep (B, C, H, W)
    branch_logits: list[Tensor] = field(default_factory=list)  # HSAKD auxiliary heads, one per stage (B, 4K)
    tokens: Tensor | None = None  # (B, N, C) H-GKD: teacher tokens / student prediction
    valid: Tensor | None = None  # (B, N) bool: tokens the teacher produced
    pooled: Tensor | None = None  # (B, C) H-GKD: pooled teacher embedding

    def map(self, fn: Callable[[Tensor], Tensor]) -> "NetOutputs":
        """``fn`` applied to every tensor (stages and branches included)."""
        def one(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)
        return NetOutputs(one(self.logits), one(self.embedding), [fn(s) for s in self.stages],
                          [fn(b) for b in self.branch_logits], one(self.tokens), one(self.valid), one(self.pooled))

    def detach(self) -> "NetOutputs":
        """Without autograd history (teacher outputs)."""
        return self.map(Tensor.detach)

    def float(self) -> "NetOutputs":
        """Floating tensors in float32 (losses run outside autocast)."""
        return self.map(lambda t: t.float() if t.is_floating_point() else t)
