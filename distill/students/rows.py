"""The ``"rows"`` backend: active sites as rows, dense compute only where a kernel needs neighbours.

Issue 13's compute-skipping student. A map is the feature rows of its active sites (like
MinkowskiEngine's, in row-major site order) plus its level (active mask and row indices):

- 1x1 convolutions are one matmul over the active rows (a strided 1x1 conv reads the rows at
  the cell's top-left site, zero where that site is inactive), so they cost the active
  fraction of a dense 1x1 conv (about half of a ResNet-50's FLOPs);
- BatchNorm, ReLU and residual adds run on the rows: the native BatchNorm kernel, statistics
  over active sites by construction, and element-wise work in proportion to the active sites;
- convolutions with k>1 and max-pooling scatter the rows into a zero-filled (or -inf-filled)
  channels-last grid, run the dense op and gather the output's active rows: SparK's masked
  dense compute, exactly equal to sparse convolution (``shared/notes/minkowskiengine.md``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sparse_ops import StageOutput, downsample_active, pool_params, rows_batch_norm


@dataclass
class RowsLevel:
    """One resolution's active sites; rows are ordered by flat site index ``b*H*W + h*W + w``."""

    active_b1hw: Tensor  # bool
    index_n: Tensor  # int64 flat site index of each row

    @classmethod
    def of(cls, active_b1hw: Tensor) -> RowsLevel:
        return cls(active_b1hw, active_b1hw.flatten().nonzero()[:, 0])

    @property
    def grid(self) -> tuple[int, int, int]:
        b, _, h, w = self.active_b1hw.shape
        return b, h, w


@dataclass
class RowsMap:
    feat_nc: Tensor
    level: RowsLevel
    stride: int


class RowsOps:
    """Sparse ResNet ops on active rows; one instance per forward (levels and row maps cached)."""

    def __init__(self, active_pix_b1hw: Tensor) -> None:
        self._levels = {1: RowsLevel.of(active_pix_b1hw)}
        self._corner_rows: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def from_pixels(cls, images_bchw: Tensor, visible_pix_bhw: Tensor) -> tuple[RowsOps, RowsMap]:
        ops = cls(visible_pix_bhw[:, None])
        level = ops._levels[1]
        pixels_nc = images_bchw.permute(0, 2, 3, 1).reshape(-1, images_bchw.shape[1]).index_select(0, level.index_n)
        return ops, RowsMap(pixels_nc, level, 1)

    def _level(self, x: RowsMap, stride: int) -> RowsLevel:
        out_stride = x.stride * stride
        if out_stride not in self._levels:
            self._levels[out_stride] = RowsLevel.of(downsample_active(x.level.active_b1hw, stride))
        return self._levels[out_stride]

    def conv(self, x: RowsMap, conv: nn.Conv2d) -> RowsMap:
        (k, _), (s, _) = conv.kernel_size, conv.stride
        level = self._level(x, s)
        if k == 1:
            rows_nc = x.feat_nc if s == 1 else self._corner_rows_of(x, level, s)
            return RowsMap(F.linear(rows_nc, conv.weight.flatten(1)), level, x.stride * s)
        return RowsMap(gather_rows(conv(scatter_rows(x.feat_nc, x.level)), level), level, x.stride * s)

    def _corner_rows_of(self, x: RowsMap, level: RowsLevel, stride: int) -> Tensor:
        """Rows of the input sites at each output site's cell corner (h*s, w*s), zero if inactive."""
        key = (x.stride, stride)
        if key not in self._corner_rows:
            b, h, w = x.level.grid
            row_of_site = torch.full((b * h * w,), len(x.level.index_n), dtype=torch.long, device=x.feat_nc.device)
            row_of_site[x.level.index_n] = torch.arange(len(x.level.index_n), device=x.feat_nc.device)
            _, h_out, w_out = level.grid
            bb, rem = level.index_n // (h_out * w_out), level.index_n % (h_out * w_out)
            corner = bb * h * w + (rem // w_out) * stride * w + (rem % w_out) * stride
            self._corner_rows[key] = row_of_site[corner]
        padded_nc = torch.cat([x.feat_nc, x.feat_nc.new_zeros(1, x.feat_nc.shape[1])])
        return padded_nc.index_select(0, self._corner_rows[key])

    def batch_norm(self, x: RowsMap, bn: nn.BatchNorm2d) -> RowsMap:
        return RowsMap(rows_batch_norm(x.feat_nc, bn), x.level, x.stride)

    def relu(self, x: RowsMap) -> RowsMap:
        return RowsMap(F.relu(x.feat_nc, inplace=True), x.level, x.stride)

    def max_pool(self, x: RowsMap, pool: nn.MaxPool2d) -> RowsMap:
        """Max over active sites only: inactive inputs are -inf."""
        k, s, p = pool_params(pool)
        level = self._level(x, s)
        pooled = F.max_pool2d(scatter_rows(x.feat_nc, x.level, float("-inf")), k, s, p)
        return RowsMap(gather_rows(pooled, level), level, x.stride * s)

    def add(self, x: RowsMap, y: RowsMap) -> RowsMap:
        if x.level is not y.level:
            raise RuntimeError(f"residual add over different levels (strides {x.stride}, {y.stride})")
        return RowsMap(x.feat_nc + y.feat_nc, x.level, x.stride)

    def densify(self, x: RowsMap) -> StageOutput:
        return scatter_rows(x.feat_nc, x.level), x.level.active_b1hw[:, 0]


def scatter_rows(feat_nc: Tensor, level: RowsLevel, fill: float = 0.0) -> Tensor:
    """Rows -> a dense (B, C, H, W) grid in channels-last memory, ``fill`` at inactive sites."""
    b, h, w = level.grid
    return ScatterRows.apply(feat_nc, level.index_n, b * h * w, fill).view(b, h, w, -1).permute(0, 3, 1, 2)


def gather_rows(feat_bchw: Tensor, level: RowsLevel) -> Tensor:
    """The active rows (C contiguous) of a dense grid."""
    return GatherRows.apply(feat_bchw.permute(0, 2, 3, 1).reshape(-1, feat_bchw.shape[1]), level.index_n)


class ScatterRows(torch.autograd.Function):
    """``grid[index] = rows`` into a ``fill``-ed grid; backward gathers (indices are unique)."""

    @staticmethod
    def forward(ctx, feat_nc: Tensor, index_n: Tensor, sites: int, fill: float) -> Tensor:
        ctx.save_for_backward(index_n)
        return feat_nc.new_full((sites, feat_nc.shape[1]), fill).index_copy_(0, index_n, feat_nc)

    @staticmethod
    def backward(ctx, grad_nc: Tensor) -> tuple[Tensor | None, ...]:
        (index_n,) = ctx.saved_tensors
        return grad_nc.index_select(0, index_n), None, None, None


class GatherRows(torch.autograd.Function):
    """``grid[index]``; backward scatters into zeros with a copy, not an accumulating add
    (``index_select``'s own backward), since the indices are unique."""

    @staticmethod
    def forward(ctx, grid_nc: Tensor, index_n: Tensor) -> Tensor:
        ctx.save_for_backward(index_n)
        ctx.sites = grid_nc.shape[0]
        return grid_nc.index_select(0, index_n)

    @staticmethod
    def backward(ctx, grad_nc: Tensor) -> tuple[Tensor | None, ...]:
        (index_n,) = ctx.saved_tensors
        return grad_nc.new_zeros(ctx.sites, grad_nc.shape[1]).index_copy_(0, index_n, grad_nc), None
