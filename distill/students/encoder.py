"""Sparse ResNet encoder of the H-GKD student (H-GKD Sec. 3.2.1, Fig. 3; SparK, Tian et al. 2023).

Convolutions are computed only at visible sites, so the mask pattern is kept through every
layer and hidden pixels never leak into the features. The parameters are exactly a timm
ResNet's (``self.body``), so the trained encoder *is* a dense timm ResNet (a dense image is
the no-mask case). Backends run the same parameters through one topology walker
(:func:`~.sparse_ops.run_resnet`):

- ``"minkowski"`` (:mod:`.minkowski`): MinkowskiEngine sparse convolutions (CPU build here).
- ``"masked"`` (:mod:`.masked`): SparK-style masked dense compute in plain torch.
- ``"rows"`` (:mod:`.rows`): active sites as rows; 1x1 convs, BN, ReLU and adds on the rows
  only, dense compute only for k>1 convs and the max-pool (issue 13).
- ``"dense"``: the ordinary timm forward on the zero-filled image (the ``sparse=off`` ablation).

The sparse backends are proven equal to ``"minkowski"`` in ``tests/test_students.py``
(values, active sites, gradients, BN running stats).
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from torch import Tensor, nn

from ...errors import HgkdError
from .masked import MaskedOps
from .minkowski import MinkowskiOps, import_minkowski
from .rows import RowsOps
from .sparse_ops import StageOutput, check_sparse_supported, run_resnet, upsample_visible

BACKENDS = ("minkowski", "masked", "rows", "dense")
STRIDES = [4, 8, 16, 32]
_OPS = {"minkowski": MinkowskiOps, "masked": MaskedOps, "rows": RowsOps}


class SparseResNetEncoder(nn.Module):
    """timm ResNet whose forward sees only visible sites; ``body`` holds the timm parameters.

    ``forward_features(images_bchw, visible_bhw)`` returns the outputs of layer1..layer4
    (strides 4, 8, 16, 32) as ``(feat_bchw, active_bhw)``, features exactly zero at inactive sites.
    """

    def __init__(self, name: str, backend: str = "minkowski", compile_bn: bool = False, **kwargs: Any) -> None:
        """``compile_bn``: the masked backend's fused BatchNorm runs through ``torch.compile``
        (optional, CPU and CUDA; the first forward compiles); ``kwargs`` go to timm."""
        super().__init__()
        if backend not in BACKENDS:
            raise HgkdError(f"unknown sparse backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if backend == "minkowski":
            import_minkowski()  # fail at construction, with the user-facing message
        self.arch = name
        self.backend = backend
        self.compile_bn = compile_bn
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
        options = {"compiled": self.compile_bn} if self.backend == "masked" else {}
        ops, x = _OPS[self.backend].from_pixels(images_bchw, visible_pix_bhw, **options)
        return run_resnet(self.body, ops, x)

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
