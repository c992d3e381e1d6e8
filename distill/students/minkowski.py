"""The ``"minkowski"`` backend: sparse convolution through MinkowskiEngine (Choy et al. 2019).

Every timm Conv2d runs as a MinkowskiEngine sparse convolution whose kernel is computed on
the fly from the timm weight, so gradients flow into the timm parameters. One coordinate
manager serves the whole forward: the coordinate map of each stride and the kernel maps
between maps are built once and reused by every block of a stage (ME caches kernel maps per
(input map, output map, kernel, stride) in the manager; issue 13 profile). Facts used here
are measured in ``shared/notes/minkowskiengine.md``: ME kernel layout
``w.permute(3, 2, 1, 0).reshape(k*k, C_in, C_out)`` for (batch, row, col) coordinates;
strided outputs come back in hash order with batches interleaved, so densifying always goes
through the coordinates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import HgkdError
from .sparse_ops import StageOutput, pool_params, rows_batch_norm


def import_minkowski() -> ModuleType:
    """MinkowskiEngine, imported on first use; a user-facing error if it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "compiled with CPU_ONLY flag" on every import
            import MinkowskiEngine as ME
    except (ImportError, OSError) as exc:
        raise HgkdError(f"the 'minkowski' sparse backend needs MinkowskiEngine, which cannot be imported "
                        f"({exc}); install it with the project's install script or use --sparse-backend masked") from None
    return ME


def manager_placement(me: ModuleType, device: torch.device) -> dict[str, Any]:
    """Coordinate-manager arguments for ``device``: CPU maps on the CPU, CUDA maps (PyTorch's
    caching allocator) on a GPU; a CPU-only MinkowskiEngine build on a GPU is a user error.
    The map type is always given: ME's own default is CUDA wherever it was built with CUDA."""
    if device.type == "cpu":
        return {"coordinate_map_type": me.CoordinateMapType.CPU}
    if device.type != "cuda" or not me.is_cuda_available():
        raise HgkdError(f"the 'minkowski' sparse backend cannot run on {device}: this MinkowskiEngine is built "
                        f"{'CPU-only' if not me.is_cuda_available() else 'for CPU and CUDA only'}; use "
                        f"--sparse-backend auto (or masked/rows), or --device cpu")
    return {"coordinate_map_type": me.CoordinateMapType.CUDA,
            "allocator_type": me.GPUMemoryAllocatorType.PYTORCH}


def me_features(feat_nc: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Features as MinkowskiEngine's kernels take them: float32/float64, contiguous. Under bf16
    autocast (the CUDA recipe) the 1x1 convs (matmuls) return bfloat16, which ME's kernels do
    not dispatch on (the first GPU run segfaulted, benchmarks/results/gpu_run1.json part p4me;
    with float32 features its CUDA bf16 test passes, gpu_run2.json):
    ME layers run in float32 and the rest of the network stays under autocast."""
    if dtype is None:
        dtype = feat_nc.dtype if feat_nc.dtype in (torch.float32, torch.float64) else torch.float32
    return feat_nc.to(dtype).contiguous()


@dataclass
class MinkowskiMap:
    """Feature rows of one coordinate map of the forward's shared coordinate manager."""

    feat_nc: Tensor
    key: Any  # MinkowskiEngine.CoordinateMapKey
    stride: int


class MinkowskiOps:
    """Sparse convolution through MinkowskiEngine with kernels taken from timm's Conv2d weights."""

    def __init__(self, me: ModuleType, manager: Any, batch_hw: tuple[int, int, int]) -> None:
        from MinkowskiEngineBackend._C import ConvolutionMode

        self.me, self.manager, self.batch_hw = me, manager, batch_hw
        self.mode = ConvolutionMode.DEFAULT
        self._generators: dict[tuple[int, int], Any] = {}

    @classmethod
    def from_pixels(cls, images_bchw: Tensor, visible_pix_bhw: Tensor) -> tuple[MinkowskiOps, MinkowskiMap]:
        """One coordinate manager for the whole forward; visible pixels are its stride-1 map."""
        me = import_minkowski()
        manager = me.CoordinateManager(D=2, **manager_placement(me, images_bchw.device))
        coords_n3 = visible_pix_bhw.to(images_bchw.device).nonzero().int().contiguous()  # (batch, row, col)
        key, (unique_n, _) = manager.insert_and_map(coords_n3, [1, 1], "")
        feat_nc = images_bchw.permute(0, 2, 3, 1)[visible_pix_bhw][unique_n]
        b, _, h, w = images_bchw.shape
        return cls(me, manager, (b, h, w)), MinkowskiMap(feat_nc, key, 1)

    def _generator(self, kernel: int, stride: int) -> Any:
        if (kernel, stride) not in self._generators:
            self._generators[kernel, stride] = self.me.KernelGenerator(kernel, stride, 1, dimension=2)
        return self._generators[kernel, stride]

    def conv(self, x: MinkowskiMap, conv: nn.Conv2d) -> MinkowskiMap:
        (k, _), (s, _) = conv.kernel_size, conv.stride
        weight = conv.weight  # (C_out, C_in, k, k)
        if k == 1 and s == 1:  # what ME.MinkowskiConvolution itself does for 1x1 (use_mm)
            return MinkowskiMap(x.feat_nc @ weight[:, :, 0, 0].t(), x.key, x.stride)
        kernel_vio = weight.permute(3, 2, 1, 0).reshape(k * k, weight.shape[1], weight.shape[0]).contiguous()
        out_key = self.me.CoordinateMapKey(3)  # filled in by ME: the (shared) map at stride * s
        feat_nc = self.me.MinkowskiConvolutionFunction.apply(
            me_features(x.feat_nc, kernel_vio.dtype), kernel_vio, self._generator(k, s), self.mode, x.key, out_key,
            self.manager)
        return MinkowskiMap(feat_nc, out_key, x.stride * s)

    def batch_norm(self, x: MinkowskiMap, bn: nn.BatchNorm2d) -> MinkowskiMap:
        return MinkowskiMap(rows_batch_norm(x.feat_nc, bn), x.key, x.stride)

    def relu(self, x: MinkowskiMap) -> MinkowskiMap:
        return MinkowskiMap(F.relu(x.feat_nc), x.key, x.stride)

    def max_pool(self, x: MinkowskiMap, pool: nn.MaxPool2d) -> MinkowskiMap:
        k, s, _ = pool_params(pool)
        out_key = self.me.CoordinateMapKey(3)
        feat_nc = self.me.MinkowskiLocalPoolingFunction.apply(
            me_features(x.feat_nc), self.me.PoolingMode.LOCAL_MAX_POOLING, self._generator(k, s), x.key, out_key, self.manager)
        return MinkowskiMap(feat_nc, out_key, x.stride * s)

    def add(self, x: MinkowskiMap, y: MinkowskiMap) -> MinkowskiMap:
        if x.key != y.key:
            raise RuntimeError(f"residual add over different coordinate maps {x.key} and {y.key}")
        return MinkowskiMap(x.feat_nc + y.feat_nc, x.key, x.stride)

    def densify(self, x: MinkowskiMap) -> StageOutput:
        """Scatter rows to a dense grid through the map's coordinates (rows are in hash order)."""
        b, h, w = self.batch_hw
        grid_hw = (-(-h // x.stride), -(-w // x.stride))
        coords_n3 = self.manager.get_coordinates(x.key).long()
        index = (coords_n3[:, 0], coords_n3[:, 1] // x.stride, coords_n3[:, 2] // x.stride)
        feat_bhwc = x.feat_nc.new_zeros(b, *grid_hw, x.feat_nc.shape[1]).index_put(index, x.feat_nc)
        active_bhw = torch.zeros(b, *grid_hw, dtype=torch.bool, device=x.feat_nc.device).index_put(
            index, torch.tensor(True, device=x.feat_nc.device))
        return feat_bhwc.permute(0, 3, 1, 2).contiguous(), active_bhw
