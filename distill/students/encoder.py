"""Sparse ResNet encoder of the H-GKD student (H-GKD Sec. 3.2.1, Fig. 3; SparK, Tian et al. 2023).

Convolutions are computed only at visible sites, so the mask pattern is kept through every
layer and hidden pixels never leak into the features. The parameters are exactly a timm
ResNet's (``self.body``), so the trained encoder *is* a dense timm ResNet (a dense image is
the no-mask case). Three backends run the same parameters:

- ``"minkowski"``: every timm Conv2d runs as a MinkowskiEngine sparse convolution whose kernel
  is computed on the fly from the timm weight, so gradients flow into the timm parameters.
- ``"masked"``: SparK-style emulation in plain torch: dense convolution on the zero-filled
  input, output multiplied by the output's active mask, BatchNorm statistics and max-pooling
  over active sites only. Proven equal to ``"minkowski"`` in ``tests/test_students.py``.
- ``"dense"``: the ordinary timm forward on the zero-filled image (the ``sparse=off`` ablation).

Facts used here are measured in ``shared/notes/minkowskiengine.md``: ME kernel layout
``w.permute(3, 2, 1, 0).reshape(k*k, C_in, C_out)`` for (batch, row, col) coordinates; a
strided conv's active output sites are ``max_pool2d(active_in, 2)``; strided outputs come back
in hash order with batches interleaved, so densifying always goes through the coordinates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeVar

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from ...errors import HgkdError

BACKENDS = ("minkowski", "masked", "dense")
STRIDES = [4, 8, 16, 32]
StageOutput = tuple[Tensor, Tensor]  # (feat_bchw with zeros at inactive sites, active_bhw bool)


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


def upsample_visible(visible_bhw: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Patch-level visibility grid (B, h, w) -> pixel-level bool mask (B, H, W)."""
    (height, width), (h, w) = image_hw, visible_bhw.shape[-2:]
    if visible_bhw.ndim != 3 or height % h or width % w:
        raise ValueError(f"visibility grid {tuple(visible_bhw.shape)} does not tile an image of {height}x{width}")
    return visible_bhw.bool().repeat_interleave(height // h, 1).repeat_interleave(width // w, 2)


def downsample_active(active_b1hw: Tensor, stride: int) -> Tensor:
    """Active sites after a stride-``stride`` conv/pool: a site is active if any input in its cell is."""
    if stride == 1:
        return active_b1hw
    return F.max_pool2d(active_b1hw.float(), stride, stride, ceil_mode=True) > 0


def check_sparse_supported(body: nn.Module) -> None:
    """The sparse backends walk timm's ResNet topology themselves; refuse what they do not model."""
    unsupported = [
        name for name, module in body.named_modules()
        if (isinstance(module, nn.Conv2d) and (module.groups != 1 or module.dilation != (1, 1)
                                                or module.bias is not None or module.padding[0] != module.kernel_size[0] // 2))
        or (isinstance(module, (BasicBlock, Bottleneck)) and not _plain_block(module))
    ]
    if not isinstance(body.conv1, nn.Conv2d) or not isinstance(body.act1, nn.ReLU) or unsupported:
        raise HgkdError(f"sparse backends support plain timm ResNets (7x7 stem, ReLU, no SE/drop-path/"
                        f"anti-aliasing/avg-down); unsupported: {unsupported or ['stem']}; "
                        f"drop those options or train with --no-sparse")


def _plain_block(block: nn.Module) -> bool:
    """ReLU activations, no SE/drop-path/anti-aliasing/drop-block, a (1x1 conv, BN) downsample."""
    acts_ok = all(isinstance(m, nn.ReLU) for n, m in block.named_children() if n.startswith("act"))
    extras_ok = all(getattr(block, n, None) is None or isinstance(getattr(block, n), nn.Identity)
                    for n in ("se", "drop_path", "aa", "drop_block"))
    downsample = block.downsample
    downsample_ok = downsample is None or (len(downsample) == 2 and isinstance(downsample[0], nn.Conv2d))
    return acts_ok and extras_ok and downsample_ok


# --------------------------------------------------------------------------- topology walker
X = TypeVar("X")


class SparseOps(Protocol[X]):
    """The operations a ResNet is made of (plus densify), on one backend's sparse map type ``X``."""

    def conv(self, x: X, conv: nn.Conv2d) -> X: ...
    def batch_norm(self, x: X, bn: nn.BatchNorm2d) -> X: ...
    def relu(self, x: X) -> X: ...
    def max_pool(self, x: X, pool: nn.MaxPool2d) -> X: ...
    def add(self, x: X, y: X) -> X: ...
    def densify(self, x: X) -> StageOutput: ...


def run_resnet(body: nn.Module, ops: SparseOps[X], x: X) -> list[StageOutput]:
    """timm ResNet forward (stem, layer1..layer4) on sparse maps; the four stage outputs densified."""
    x = ops.max_pool(ops.relu(_conv_bn(ops, x, body.conv1, body.bn1)), body.maxpool)
    stages = []
    for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in layer:
            x = _run_block(ops, block, x)
        stages.append(ops.densify(x))
    return stages


def _conv_bn(ops: SparseOps[X], x: X, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> X:
    return ops.batch_norm(ops.conv(x, conv), bn)


def _run_block(ops: SparseOps[X], block: nn.Module, x: X) -> X:
    """timm BasicBlock / Bottleneck (stride on the 3x3 conv), residual on identical sites."""
    out = ops.relu(_conv_bn(ops, x, block.conv1, block.bn1))
    if isinstance(block, Bottleneck):
        out = ops.relu(_conv_bn(ops, out, block.conv2, block.bn2))
        out = _conv_bn(ops, out, block.conv3, block.bn3)
    else:
        out = _conv_bn(ops, out, block.conv2, block.bn2)
    shortcut = x if block.downsample is None else _conv_bn(ops, x, block.downsample[0], block.downsample[1])
    return ops.relu(ops.add(out, shortcut))


def batch_norm_args(bn: nn.BatchNorm2d) -> tuple[Tensor | None, Tensor | None, bool, float]:
    """``(running_mean, running_var, use_batch_stats, momentum)`` exactly as ``nn.BatchNorm2d.forward``
    derives them (bumping ``num_batches_tracked`` in training), for BN over active sites only."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return (bn.running_mean if keep else None), (bn.running_var if keep else None), use_batch_stats, momentum


# --------------------------------------------------------------------------- "masked" backend
@dataclass
class MaskedMap:
    """Dense features, exactly zero at inactive sites, and the active mask."""

    feat_bchw: Tensor
    active_b1hw: Tensor  # bool


class MaskedOps:
    """SparK-style masked dense compute (Tian et al. 2023), equal to sparse convolution."""

    def conv(self, x: MaskedMap, conv: nn.Conv2d) -> MaskedMap:
        active_b1hw = downsample_active(x.active_b1hw, conv.stride[0])
        return MaskedMap(conv(x.feat_bchw) * active_b1hw, active_b1hw)

    def batch_norm(self, x: MaskedMap, bn: nn.BatchNorm2d) -> MaskedMap:
        running_mean, running_var, use_batch_stats, momentum = batch_norm_args(bn)
        mean_c, var_c = running_mean, running_var
        if use_batch_stats:
            mean_c, var_c = masked_moments(x.feat_bchw, x.active_b1hw)
            if running_mean is not None:
                n = x.active_b1hw.sum()
                with torch.no_grad():
                    running_mean.lerp_(mean_c, momentum)
                    # unbiased, as F.batch_norm; a lone active site (n = 1) must not write inf
                    running_var.lerp_(var_c * n / (n - 1).clamp_min(1), momentum)
        scale_c = torch.rsqrt(var_c + bn.eps)
        if bn.weight is not None:
            scale_c = scale_c * bn.weight
        shift_c = -mean_c * scale_c if bn.bias is None else bn.bias - mean_c * scale_c
        out_bchw = x.feat_bchw * scale_c[:, None, None] + shift_c[:, None, None]
        return MaskedMap(out_bchw * x.active_b1hw, x.active_b1hw)

    def relu(self, x: MaskedMap) -> MaskedMap:
        return MaskedMap(F.relu(x.feat_bchw), x.active_b1hw)

    def max_pool(self, x: MaskedMap, pool: nn.MaxPool2d) -> MaskedMap:
        """Max over active sites only: inactive inputs are -inf, inactive outputs zero."""
        pooled_bchw = pool(x.feat_bchw.masked_fill(~x.active_b1hw, float("-inf")))
        active_b1hw = downsample_active(x.active_b1hw, _int(pool.stride))
        return MaskedMap(torch.where(active_b1hw, pooled_bchw, 0.0), active_b1hw)

    def add(self, x: MaskedMap, y: MaskedMap) -> MaskedMap:
        return MaskedMap(x.feat_bchw + y.feat_bchw, x.active_b1hw)

    def densify(self, x: MaskedMap) -> StageOutput:
        return x.feat_bchw, x.active_b1hw[:, 0]


def masked_moments(feat_bchw: Tensor, active_b1hw: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over active sites (``feat_bchw`` is zero elsewhere)."""
    n = active_b1hw.sum()
    mean_c = feat_bchw.sum((0, 2, 3)) / n
    centred_bchw = (feat_bchw - mean_c[:, None, None]) * active_b1hw
    return mean_c, centred_bchw.square().sum((0, 2, 3)) / n


def _int(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


# --------------------------------------------------------------------------- "minkowski" backend
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
        if images_bchw.device.type != "cpu":
            raise HgkdError(f"the 'minkowski' sparse backend takes CPU tensors only; images are on "
                            f"{images_bchw.device}: use --sparse-backend masked or --device cpu")
        manager = me.CoordinateManager(D=2)
        coords_n3 = visible_pix_bhw.nonzero().int().contiguous()  # (batch, row, col)
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
            x.feat_nc, kernel_vio, self._generator(k, s), self.mode, x.key, out_key, self.manager)
        return MinkowskiMap(feat_nc, out_key, x.stride * s)

    def batch_norm(self, x: MinkowskiMap, bn: nn.BatchNorm2d) -> MinkowskiMap:
        running_mean, running_var, use_batch_stats, momentum = batch_norm_args(bn)
        feat_nc = F.batch_norm(x.feat_nc, running_mean, running_var, bn.weight, bn.bias,
                               use_batch_stats, momentum, bn.eps)
        return MinkowskiMap(feat_nc, x.key, x.stride)

    def relu(self, x: MinkowskiMap) -> MinkowskiMap:
        return MinkowskiMap(F.relu(x.feat_nc), x.key, x.stride)

    def max_pool(self, x: MinkowskiMap, pool: nn.MaxPool2d) -> MinkowskiMap:
        k, s = _int(pool.kernel_size), _int(pool.stride)
        out_key = self.me.CoordinateMapKey(3)
        feat_nc = self.me.MinkowskiLocalPoolingFunction.apply(
            x.feat_nc, self.me.PoolingMode.LOCAL_MAX_POOLING, self._generator(k, s), x.key, out_key, self.manager)
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
        active_bhw = torch.zeros(b, *grid_hw, dtype=torch.bool).index_put(index, torch.tensor(True))
        return feat_bhwc.permute(0, 3, 1, 2).contiguous(), active_bhw


# --------------------------------------------------------------------------- the encoder
class SparseResNetEncoder(nn.Module):
    """timm ResNet whose forward sees only visible sites; ``body`` holds the timm parameters.

    ``forward_features(images_bchw, visible_bhw)`` returns the outputs of layer1..layer4
    (strides 4, 8, 16, 32) as ``(feat_bchw, active_bhw)``, features exactly zero at inactive sites.
    """

    def __init__(self, name: str, backend: str = "minkowski", **kwargs: Any) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise HgkdError(f"unknown sparse backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if backend == "minkowski":
            import_minkowski()  # fail at construction, with the user-facing message
        self.arch = name
        self.backend = backend
        self.body = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        if backend != "dense":
            check_sparse_supported(self.body)
        self.channels = [int(info["num_chs"]) for info in self.body.feature_info[1:]]
        self.strides = list(STRIDES)

    def forward_features(self, images_bchw: Tensor, visible_bhw: Tensor) -> list[StageOutput]:
        """Four stage outputs; ``visible_bhw`` is a patch-level grid (True = visible), hidden
        pixels are absent (sparse backends) or zero (dense backend)."""
        visible_pix_bhw = upsample_visible(visible_bhw.to(images_bchw.device), tuple(images_bchw.shape[-2:]))
        if self.backend == "dense":
            return self._forward_dense(images_bchw * visible_pix_bhw[:, None])
        if self.backend == "minkowski":
            ops, x = MinkowskiOps.from_pixels(images_bchw, visible_pix_bhw)
            return run_resnet(self.body, ops, x)
        visible_b1hw = visible_pix_bhw[:, None]
        return run_resnet(self.body, MaskedOps(), MaskedMap(images_bchw * visible_b1hw, visible_b1hw))

    def _forward_dense(self, images_bchw: Tensor) -> list[StageOutput]:
        """The ordinary timm forward; every site is active (the ``sparse=off`` ablation)."""
        body = self.body
        x = body.maxpool(body.act1(body.bn1(body.conv1(images_bchw))))
        stages = []
        for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
            x = layer(x)
            stages.append((x, torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool, device=x.device)))
        return stages

    def forward(self, images_bchw: Tensor, visible_bhw: Tensor) -> list[StageOutput]:
        return self.forward_features(images_bchw, visible_bhw)
