"""BEiT teacher (Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers").

Built on timm's ``Beit`` (``beit_large_patch16_224`` layout: layer scale ``gamma_1/gamma_2``,
``q_bias/v_bias``, no absolute position embedding). The official pre-training checkpoints
(microsoft/unilm ``beit/modeling_pretrain.py``, e.g. ``beit_large_patch16_224_pt22k.pth`` =
``{'model': ...}``) use one relative position bias shared by all blocks
(``rel_pos_bias.relative_position_bias_table`` plus its index buffer), a learned
``mask_token`` and the tokenizer head ``lm_head.*``. The filter keeps ``mask_token``, drops
``lm_head.*`` and the index buffers, then applies timm's BEiT filter (table resizing).

Masked view (H-GKD Sec. 3.1): patch embeddings at masked positions are replaced by the mask
token, ``x = x * (1 - w) + mask_token * w``, as in BEiT pre-training; all outputs are valid.
The pt22k release was trained on ImageNet-22k with mean = std = 0.5, the default here.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from timm.models.beit import checkpoint_filter_fn as timm_beit_filter
from torch import Tensor, nn

from .base import StateDict, Teacher, register_teacher


def checkpoint_filter_fn(state_dict: StateDict, model: "BeitTeacher") -> StateDict:
    """Adapt an official BEiT pre-training checkpoint: drop ``lm_head.*`` and the
    ``relative_position_index`` buffers, keep ``mask_token``.

    Keys the model has go through timm's BEiT filter (resizes tables for another image
    size); the rest pass unchanged so the strict load can report them.
    """
    expected = model.state_dict()
    kept = {k: v for k, v in state_dict.items()
            if not k.startswith("lm_head.") and "relative_position_index" not in k}
    out = timm_beit_filter({k: v for k, v in kept.items() if k in expected}, model)
    out.update({k: v for k, v in kept.items() if k not in expected})
    return out


class BeitTeacher(Teacher, Beit):
    """Frozen BEiT encoder that sees mask tokens in place of the hidden patches."""

    family = "beit"
    outputs_masked_tokens = True
    visible_only = False

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-5,
        mean: tuple[float, ...] = IMAGENET_INCEPTION_MEAN,
        std: tuple[float, ...] = IMAGENET_INCEPTION_STD,
        **beit_kwargs: Any,
    ) -> None:
        options = dict(use_abs_pos_emb=False, use_rel_pos_bias=False,
                       use_shared_rel_pos_bias=True, **beit_kwargs)
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=init_values,
            num_classes=0, global_pool="", **options,
        )
        self._set_teacher_attrs(img_size, patch_size, embed_dim, mean, std)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self)

    def _forward_masked(self, images_bchw: Tensor, mask_bn: Tensor | None) -> tuple[Tensor, Tensor]:
        x_bnc = self.patch_embed(images_bchw)
        if mask_bn is not None:
            w_bn1 = mask_bn.unsqueeze(-1).to(x_bnc.dtype)
            x_bnc = x_bnc * (1 - w_bn1) + self.mask_token.to(x_bnc.dtype) * w_bn1
        x = torch.cat([self.cls_token.expand(x_bnc.shape[0], -1, -1), x_bnc], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = block(x, shared_rel_pos_bias=rel_pos_bias)
        tokens_bnc = self.norm(x)[:, 1:]
        valid_bn = torch.ones(tokens_bnc.shape[:2], dtype=torch.bool, device=tokens_bnc.device)
        return tokens_bnc, valid_bn


def _build(img_size: int, defaults: dict[str, Any], kwargs: dict[str, Any]) -> BeitTeacher:
    return BeitTeacher(img_size=img_size, **{**defaults, **kwargs})


@register_teacher
def beit_large_patch16(img_size: int = 224, **kwargs: Any) -> BeitTeacher:
    """BEiT-L/16 (official ``beit_large_patch16_224_pt22k.pth``): dim 1024, depth 24, 16 heads,
    shared relative position bias, layer scale 1e-5."""
    return _build(img_size, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_teacher
def beit_tiny_patch16(img_size: int = 224, **kwargs: Any) -> BeitTeacher:
    """Tiny BEiT-style ViT for tests and demos: dim 64, depth 2, 2 heads, MLP ratio 2."""
    return _build(img_size, dict(patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                 mlp_ratio=2.0, init_values=0.1), kwargs)
