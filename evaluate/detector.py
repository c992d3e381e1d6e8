"""torchvision's Faster R-CNN / Mask R-CNN with a feature pyramid over a student's four stages.

The H-GKD paper (Sec. 4.1, Table 4) puts the student's weights in the backbone, appends the
Faster R-CNN and Mask R-CNN neck and heads, and fine-tunes all layers. Here the trunk is the
timm ResNet that ``hgkd-evaluate`` loads (``layer1``-``layer4``: strides 4-32, detectron2's
res2-res5), the neck torchvision's ``BackboneWithFPN`` (P2-P6, ``LastLevelMaxPool``) and the
heads torchvision's. Nothing is re-implemented: only which parts, and which normalisation.

Two normalisations, as the field fine-tunes a pre-trained ResNet on COCO (``NORMS``):

* ``syncbn`` (the default): BatchNorm trained in the trunk, the FPN and the heads (a 4-conv +
  1-fc box head and a 4-conv mask head, each conv with BN), nothing frozen; SyncBatchNorm across
  ranks under DDP on CUDA. The self-supervised protocol (MoCo's detection configs, mmdetection's
  ``selfsup_pretrain`` configs, SparK's ``downstream_d2``). A distilled or scratch trunk has no
  ImageNet-calibrated statistics to freeze: an H-GKD student's BN statistics come from sparse,
  masked inputs, and a scratch timm ResNet's from nothing (its last BN per block starts at
  gamma 0, so frozen it would switch every residual branch off for good).
* ``frozen``: detectron2's supervised recipe (``mask_rcnn_R_50_FPN_1x``): every trunk BN is a
  ``torchvision.ops.FrozenBatchNorm2d`` with the loaded statistics, the stem and ``layer1``
  (res2) are frozen (``FREEZE_AT=2``), the FPN has no norm, the box head is two fc layers and
  the mask head four plain convs (torchvision's defaults).

Any timm ``ResNet`` has a pyramid mapping (``PYRAMID_STAGES`` with channels from its
``feature_info``): resnet18/34/50 (the student registry's) and the small ``test_resnet``; other
architectures are refused in one line.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..errors import HgkdError
from .detection_recipe import DETECTORS, NORMS

PYRAMID_STAGES = ("layer1", "layer2", "layer3", "layer4")  # res2..res5 of detectron2
FROZEN_AT = ("conv1", "bn1", "layer1")  # detectron2 FREEZE_AT=2: the stem and res2


def pyramid_channels(trunk: nn.Module, arch: str) -> list[int]:
    """Channels of the four stages the FPN reads; one line for a trunk without the mapping."""
    info = getattr(trunk, "feature_info", None)
    stages = {f["module"]: f["num_chs"] for f in info} if info is not None else {}
    if type(trunk).__name__ != "ResNet" or any(s not in stages for s in PYRAMID_STAGES):
        raise HgkdError(f"--model {arch}: no feature-pyramid mapping for this architecture (detection takes timm "
                        f"ResNets with stages {', '.join(PYRAMID_STAGES)}: resnet18, resnet34, resnet50, ...)")
    return [stages[s] for s in PYRAMID_STAGES]


def build_detector(trunk: nn.Module, num_classes: int, *, arch: str = "trunk", detector: str = "maskrcnn",
                   norm: str = "syncbn", train_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800),
                   max_size: int = 1333, width: int = 256, rois_per_image: int = 512,
                   proposals: tuple[int, int] = (2000, 1000), detections_per_image: int = 100) -> nn.Module:
    """A torchvision detector for ``num_classes`` categories (plus background) around ``trunk``.

    The trunk is used as it is (not copied): its weights become ``backbone.body``'s. Sizes are
    torchvision's ``min_size`` (training: one drawn per image; ``set_sizes`` before testing) and
    ``max_size``; ``width`` is the FPN
    and head width (256 in every published recipe); ``rois_per_image`` the sampled RoIs per
    training image; ``proposals`` the RPN's post-NMS proposals per image (train, test).
    """
    if detector not in DETECTORS or norm not in NORMS:
        raise HgkdError(f"--detector {detector} / --norm {norm}: choose from {DETECTORS} / {NORMS}")
    channels = pyramid_channels(trunk, arch)
    bn = nn.BatchNorm2d if norm == "syncbn" else None
    if norm == "frozen":
        trunk = freeze_batchnorm(trunk)
        for name, param in trunk.named_parameters():
            param.requires_grad_(not name.startswith(tuple(f"{m}." for m in FROZEN_AT)))
    backbone = BackboneWithFPN(trunk, {s: str(i) for i, s in enumerate(PYRAMID_STAGES)}, channels, width,
                               extra_blocks=LastLevelMaxPool(), norm_layer=bn)
    if norm == "syncbn":
        box_head = FastRCNNConvFCHead((width, 7, 7), [width] * 4, [1024], norm_layer=nn.BatchNorm2d)
    else:
        box_head = TwoMLPHead(width * 7 * 7, 1024)
    common = dict(min_size=train_sizes, max_size=max_size, box_head=box_head,
                  box_predictor=FastRCNNPredictor(1024, num_classes + 1),
                  rpn_pre_nms_top_n_train=proposals[0], rpn_post_nms_top_n_train=proposals[0],
                  rpn_pre_nms_top_n_test=proposals[1], rpn_post_nms_top_n_test=proposals[1],
                  box_batch_size_per_image=rois_per_image, box_detections_per_img=detections_per_image)
    if detector == "fasterrcnn":
        model = FasterRCNN(backbone, **common)
    else:
        model = MaskRCNN(backbone, mask_head=MaskRCNNHeads(width, [width] * 4, 1, norm_layer=bn),
                         mask_predictor=MaskRCNNPredictor(width, width, num_classes + 1), **common)
    return model


def set_sizes(model: nn.Module, sizes: tuple[int, ...]) -> None:
    """The short sides torchvision resizes to: one drawn per image in training, the last in eval."""
    model.transform.min_size = tuple(sizes)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` replaced by a ``FrozenBatchNorm2d`` with its affine and running statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, name).copy_(getattr(module, name))
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def check_trunk_used(trunk_state: dict[str, torch.Tensor], model: nn.Module, spec: str) -> None:
    """Strict loading: every trunk tensor is in ``backbone.body`` with the same value, nothing left
    over (``num_batches_tracked`` counters excepted: frozen BN has none)."""
    body = model.backbone.body.state_dict()
    wanted = {k: v for k, v in trunk_state.items() if not k.endswith("num_batches_tracked")}
    unused = sorted(k for k in wanted if k not in body or not torch.equal(body[k].cpu(), wanted[k].cpu()))
    extra = sorted(k for k in body if k not in wanted and not k.endswith("num_batches_tracked"))
    if unused or extra:
        raise HgkdError(f"--model {spec}: trunk weights not all used by the detector backbone "
                        f"(unused {unused[:3]}, not from the trunk {extra[:3]})")


def sync_batchnorm(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """SyncBatchNorm across ranks under DDP on CUDA (torch's SyncBatchNorm has no CPU kernels)."""
    if world > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


__all__ = ["NORMS", "DETECTORS", "build_detector", "check_trunk_used", "freeze_batchnorm", "pyramid_channels",
           "set_sizes", "sync_batchnorm"]
