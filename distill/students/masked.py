"""The ``"masked"`` backend: SparK-style masked dense compute (Tian et al. 2023), equal to sparse conv.

Dense convolution on the zero-filled input, inactive output sites zeroed, BatchNorm statistics
and max-pooling over active sites only. Issue 13 made it cheap without changing its results:

- each resolution's mask, its 0/1 weight in the feature dtype and its active count are made
  once per forward (:class:`MaskLevel`), not per layer;
- a 1x1 convolution of a map that is zero at inactive sites is zero there too (no padding, no
  bias), so its output needs no mask; a k>1 conv output is masked inside the BatchNorm that
  follows it, not by a separate multiply;
- BatchNorm over active sites is one autograd function (:class:`MaskedBatchNorm`): mean and
  variance from one pass of sums (``sum x``, ``sum x^2``, accumulated in float32 or float64;
  ``E[x^2] - E[x]^2`` loses digits only when ``|mean| >> std``, which the float32 tests bound),
  normalisation and affine in one native pass, the mask in place, and a hand-written backward
  (the BN gradient over the ``n`` active sites only);
- optionally (``compile_bn``) both halves run through ``torch.compile`` as fused loops.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sparse_ops import StageOutput, batch_norm_args, downsample_active, pool_params

_DIMS = (0, 2, 3)


@dataclass
class MaskLevel:
    """One resolution's active sites, shared by every map at that stride in one forward."""

    active_b1hw: Tensor  # bool
    count: Tensor  # int64 scalar: active sites over the batch
    _weights: dict[torch.dtype, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, active_b1hw: Tensor) -> MaskLevel:
        return cls(active_b1hw, active_b1hw.sum())

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The mask as 0/1 values of ``dtype`` (made once per dtype)."""
        if dtype not in self._weights:
            self._weights[dtype] = self.active_b1hw.to(dtype)
        return self._weights[dtype]


@dataclass
class MaskedMap:
    """Dense features and their level; ``clean``: exactly zero at inactive sites."""

    feat_bchw: Tensor
    level: MaskLevel
    stride: int
    clean: bool = True  # False only for a k>1 conv output before its BatchNorm

    @property
    def active_b1hw(self) -> Tensor:
        return self.level.active_b1hw


class MaskedOps:
    """SparK-style masked dense compute over the levels of one forward pass."""

    def __init__(self, active_pix_b1hw: Tensor, compiled: bool = False) -> None:
        self._levels = {1: MaskLevel.of(active_pix_b1hw)}
        self.kernels = compiled_kernels() if compiled else EAGER

    @classmethod
    def from_pixels(cls, images_bchw: Tensor, visible_pix_bhw: Tensor,
                    compiled: bool = False) -> tuple[MaskedOps, MaskedMap]:
        """``compiled``: run the fused BatchNorm through ``torch.compile`` (optional; CPU and CUDA)."""
        ops = cls(visible_pix_bhw[:, None], compiled)
        level = ops._levels[1]
        return ops, MaskedMap(images_bchw * level.weight(images_bchw.dtype), level, 1)

    def _level(self, x: MaskedMap, stride: int) -> MaskLevel:
        out_stride = x.stride * stride
        if out_stride not in self._levels:
            self._levels[out_stride] = MaskLevel.of(downsample_active(x.active_b1hw, stride))
        return self._levels[out_stride]

    @staticmethod
    def _clean(x: MaskedMap) -> Tensor:
        return x.feat_bchw if x.clean else x.feat_bchw * x.level.weight(x.feat_bchw.dtype)

    def conv(self, x: MaskedMap, conv: nn.Conv2d) -> MaskedMap:
        stride = conv.stride[0]
        return MaskedMap(conv(self._clean(x)), self._level(x, stride), x.stride * stride,
                         clean=conv.kernel_size[0] == 1)

    def batch_norm(self, x: MaskedMap, bn: nn.BatchNorm2d) -> MaskedMap:
        running_mean, running_var, use_batch_stats, momentum = batch_norm_args(bn)
        mask_b1hw = x.level.weight(x.feat_bchw.dtype)
        if not use_batch_stats:
            out_bchw = F.batch_norm(self._clean(x), running_mean, running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            return MaskedMap(out_bchw * mask_b1hw, x.level, x.stride)
        out_bchw, mean_c, var_c = MaskedBatchNorm.apply(x.feat_bchw, mask_b1hw, x.level.count, bn.weight, bn.bias,
                                                        bn.eps, x.clean, self.kernels)
        if running_mean is not None:
            n = x.level.count.to(var_c.dtype)
            with torch.no_grad():
                running_mean.lerp_(mean_c.to(running_mean.dtype), momentum)
                # unbiased, as F.batch_norm; a lone active site (n = 1) must not write inf
                running_var.lerp_((var_c * n / (n - 1).clamp_min(1)).to(running_var.dtype), momentum)
        return MaskedMap(out_bchw, x.level, x.stride)

    def relu(self, x: MaskedMap) -> MaskedMap:
        return MaskedMap(F.relu(x.feat_bchw, inplace=True), x.level, x.stride, x.clean)

    def max_pool(self, x: MaskedMap, pool: nn.MaxPool2d) -> MaskedMap:
        """Max over active sites only: inactive inputs are -inf, inactive outputs zero."""
        pooled_bchw = pool(x.feat_bchw.masked_fill(~x.active_b1hw, float("-inf")))
        level = self._level(x, pool_params(pool)[1])
        return MaskedMap(torch.where(level.active_b1hw, pooled_bchw, 0.0), level, x.stride * pool_params(pool)[1])

    def add(self, x: MaskedMap, y: MaskedMap) -> MaskedMap:
        return MaskedMap(self._clean(x) + self._clean(y), x.level, x.stride)

    def densify(self, x: MaskedMap) -> StageOutput:
        return self._clean(x), x.active_b1hw[:, 0]


def active_moments(x_bchw: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over the ``count`` active sites of ``x_bchw`` (zero
    elsewhere), from one pass of sums accumulated in float32 (float64 for float64 input)."""
    stat_dtype = torch.float64 if x_bchw.dtype == torch.float64 else torch.float32
    n = count.to(stat_dtype)
    mean_c = x_bchw.sum(_DIMS, dtype=stat_dtype) / n
    mean_sq_c = (x_bchw * x_bchw).sum(_DIMS, dtype=stat_dtype) / n
    return mean_c, (mean_sq_c - mean_c.square()).clamp_min(0)


def _c11(values_c: Tensor, dtype: torch.dtype) -> Tensor:
    return values_c.to(dtype)[:, None, None]


def batch_norm_forward(x_bchw: Tensor, mask_b1hw: Tensor, count: Tensor, weight: Tensor | None,
                       bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out_bchw, mean_c, var_c, invstd_c)``: BN over the active sites of ``x_bchw`` (zero
    elsewhere), output masked."""
    mean_c, var_c = active_moments(x_bchw, count)
    stat_dtype = mean_c.dtype
    # eval-mode batch_norm with the active-site statistics: one native pass for the affine
    out_bchw = F.batch_norm(x_bchw, mean_c, var_c, _as(weight, stat_dtype), _as(bias, stat_dtype), False, 0.0, eps)
    return out_bchw.mul_(mask_b1hw), mean_c, var_c, torch.rsqrt(var_c + eps)


def batch_norm_backward(grad_bchw: Tensor, x_bchw: Tensor, mask_b1hw: Tensor, count: Tensor, mean_c: Tensor,
                        invstd_c: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x_bchw, grad_weight_c, grad_bias_c)`` of :func:`batch_norm_forward` (stats in float32/64)."""
    n = count.to(mean_c.dtype)
    g_bchw = grad_bchw * mask_b1hw
    # sum(g) and sum(g * xhat) per channel in one native pass (g is zero off the active sites)
    _, dot_c, sum_g_c = torch.ops.aten.native_batch_norm_backward(
        g_bchw, x_bchw, _as(weight, mean_c.dtype), None, None, mean_c, invstd_c, True, eps, [False, True, True])
    dot_c, sum_g_c = dot_c.to(mean_c.dtype), sum_g_c.to(mean_c.dtype)
    a_c = invstd_c if weight is None else invstd_c * weight
    b_c = -a_c * invstd_c * dot_c / n
    c_c = -a_c * sum_g_c / n - b_c * mean_c
    grad_x = torch.addcmul(_c11(c_c, g_bchw.dtype), g_bchw, _c11(a_c, g_bchw.dtype))
    return grad_x.addcmul_(x_bchw, _c11(b_c, g_bchw.dtype)).mul_(mask_b1hw), dot_c, sum_g_c


class BatchNormKernels(NamedTuple):
    """The two halves of :class:`MaskedBatchNorm`, eager or ``torch.compile``-d."""

    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., tuple[Tensor, ...]]


EAGER = BatchNormKernels(batch_norm_forward, batch_norm_backward)


@functools.cache
def compiled_kernels() -> BatchNormKernels:
    """``torch.compile`` of both halves (one fused loop each for the mask, sums and affine; shapes
    dynamic, so one compilation serves every layer). CPU: C++/OpenMP; CUDA: Triton."""
    return BatchNormKernels(torch.compile(batch_norm_forward, dynamic=True),
                            torch.compile(batch_norm_backward, dynamic=True))


class MaskedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over active sites, output zero at inactive sites.

    ``apply(feat_bchw, mask_b1hw, count, weight, bias, eps, clean, kernels) -> (out_bchw, mean_c, var_c)``;
    ``clean=False`` masks ``feat_bchw`` first (a k>1 conv output). Backward (``n`` active sites,
    ``g`` the masked output gradient, ``xhat`` the normalised input):
    ``dx = w * invstd * (g - sum(g) / n - xhat * sum(g * xhat) / n)`` at active sites, zero elsewhere.
    """

    @staticmethod
    def forward(ctx, feat_bchw: Tensor, mask_b1hw: Tensor, count: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float, clean: bool,
                kernels: BatchNormKernels = EAGER) -> tuple[Tensor, Tensor, Tensor]:
        x_bchw = (feat_bchw if clean else feat_bchw * mask_b1hw).detach()  # one compiled variant, not two
        out_bchw, mean_c, var_c, invstd_c = kernels.forward(x_bchw, mask_b1hw, count, _detached(weight),
                                                            _detached(bias), eps)
        ctx.eps, ctx.kernels = eps, kernels
        ctx.save_for_backward(x_bchw, mask_b1hw, count, mean_c, invstd_c, weight)
        ctx.mark_non_differentiable(mean_c, var_c)
        return out_bchw, mean_c, var_c

    @staticmethod
    def backward(ctx, grad_bchw: Tensor, _grad_mean: Tensor, _grad_var: Tensor) -> tuple[Tensor | None, ...]:
        x_bchw, mask_b1hw, count, mean_c, invstd_c, weight = ctx.saved_tensors
        grad_x, dot_c, sum_g_c = ctx.kernels.backward(grad_bchw.contiguous(memory_format=_format_of(x_bchw)), x_bchw,
                                                      mask_b1hw, count, mean_c, invstd_c, _detached(weight), ctx.eps)
        grad_weight = dot_c.to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        grad_bias = sum_g_c.to(bias_dtype(weight, grad_bchw)) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_weight, grad_bias, None, None, None


def _format_of(x_bchw: Tensor) -> torch.memory_format:
    return torch.channels_last if x_bchw.is_contiguous(memory_format=torch.channels_last) and \
        not x_bchw.is_contiguous() else torch.contiguous_format


def _detached(param_c: Tensor | None) -> Tensor | None:
    return None if param_c is None else param_c.detach()


def _as(param_c: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if param_c is None else param_c.to(dtype)


def bias_dtype(weight: Tensor | None, grad_bchw: Tensor) -> torch.dtype:
    return grad_bchw.dtype if weight is None else weight.dtype
