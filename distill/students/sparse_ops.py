"""What every sparse backend of the student shares (H-GKD Sec. 3.2.1; SparK, Tian et al. 2023).

One topology walker (:func:`run_resnet`) runs a timm ResNet's stem and four stages over a
small :class:`SparseOps` protocol; each backend implements the protocol on its own sparse map
type and is proven equal to the others by ``tests/test_students.py``. Active sites follow
MinkowskiEngine's rules (``shared/notes/minkowskiengine.md``): a stride-1 op keeps its input's
sites, a strided conv or pool activates a site if any input in its cell is active.
"""
from __future__ import annotations

from typing import Protocol, TypeVar

import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from ...errors import HgkdError

StageOutput = tuple[Tensor, Tensor]  # (feat_bchw with zeros at inactive sites, active_bhw bool)
X = TypeVar("X")


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


class SparseOps(Protocol[X]):
    """The operations a ResNet is made of (plus densify), on one backend's sparse map type ``X``.

    ``relu`` may work in place: the walker applies it only to fresh BN or add outputs.
    """

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


def rows_batch_norm(feat_nc: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """BatchNorm over the rows of active sites: the native kernel, statistics over rows only."""
    running_mean, running_var, use_batch_stats, momentum = batch_norm_args(bn)
    return F.batch_norm(feat_nc, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, momentum, bn.eps)


def pool_params(pool: nn.MaxPool2d) -> tuple[int, int, int]:
    """``(kernel, stride, padding)`` of a square max-pool."""
    return tuple(v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))


__all__ = ["SparseOps", "StageOutput", "batch_norm_args", "check_sparse_supported", "downsample_active",
           "pool_params", "rows_batch_norm", "run_resnet", "upsample_visible"]
