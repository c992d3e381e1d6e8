"""MAE teacher (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The official code (facebookresearch/mae, ``models_mae.py``) builds its encoder from timm's
``PatchEmbed`` and ``Block``, so its encoder keys are timm ``VisionTransformer`` keys:
``cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*``. The position embedding is
a fixed 2D sin-cos table (column coordinate first, zero cls slot) stored in the checkpoint.
Release files: ``mae_pretrain_vit_large.pth`` = ``{'model': encoder}``; the full
"visualize" checkpoint also carries the decoder (``mask_token, decoder_*``), dropped here.

Masked view (H-GKD Sec. 3.1): the encoder runs on the visible patches only, exactly as in
MAE pre-training, so masked positions have no output: they are zeros with ``valid=False``.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from .base import StateDict, Teacher, register_teacher
from .layers import gather_tokens, scatter_tokens, sincos_pos_embed_2d, split_indices

DECODER_PREFIXES = ("decoder_", "mask_token")


def checkpoint_filter_fn(state_dict: StateDict, model: "MaeTeacher") -> StateDict:
    """Keep the encoder of an official MAE checkpoint (timm key layout).

    Drops decoder keys (``mask_token``, ``decoder_*``). If the image size differs from the
    checkpoint's, the fixed sin-cos ``pos_embed`` is regenerated for the new grid instead of
    being interpolated.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        out["pos_embed"] = model.pos_embed.detach().clone()
    return out


class MaeTeacher(Teacher, VisionTransformer):
    """Frozen MAE ViT encoder that sees only the visible patches."""

    family = "mae"
    outputs_masked_tokens = False
    visible_only = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
            global_pool="token", class_token=True, **vit_kwargs,
        )
        self._set_teacher_attrs(img_size, patch_size, embed_dim, mean, std)
        with torch.no_grad():  # MAE's fixed table; a checkpoint overwrites it with the same
            self.pos_embed.copy_(sincos_pos_embed_2d(self.grid_size, embed_dim, "col"))

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self)

    def _forward_masked(self, images_bchw: Tensor, mask_bn: Tensor | None) -> tuple[Tensor, Tensor]:
        x_bnc = self.patch_embed(images_bchw) + self.pos_embed[:, 1:]
        batch, num_patches = x_bnc.shape[:2]
        if mask_bn is None:
            mask_bn = torch.zeros(batch, num_patches, dtype=torch.bool, device=x_bnc.device)
        ids_visible_bv, _ = split_indices(mask_bn)
        visible_bvc = self._encode(gather_tokens(x_bnc, ids_visible_bv))
        zeros_bnc = x_bnc.new_zeros(batch, num_patches, visible_bvc.shape[-1])
        tokens_bnc = scatter_tokens(zeros_bnc, ids_visible_bv, visible_bvc)
        return tokens_bnc, ~mask_bn

    def _encode(self, visible_bvc: Tensor) -> Tensor:
        """cls (+ its pos embed), transformer blocks, final norm; returns patch tokens."""
        cls_b1c = (self.cls_token + self.pos_embed[:, :1]).expand(visible_bvc.shape[0], -1, -1)
        x = torch.cat([cls_b1c, visible_bvc], dim=1)
        x = self.blocks(self.norm_pre(x))
        return self.norm(x)[:, 1:]


def _build(img_size: int, defaults: dict[str, Any], kwargs: dict[str, Any]) -> MaeTeacher:
    return MaeTeacher(img_size=img_size, **{**defaults, **kwargs})


@register_teacher
def mae_vit_large_patch16(img_size: int = 224, **kwargs: Any) -> MaeTeacher:
    """MAE ViT-L/16 (official ``mae_pretrain_vit_large.pth``): dim 1024, depth 24, 16 heads."""
    return _build(img_size, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_teacher
def mae_vit_tiny_patch16(img_size: int = 224, **kwargs: Any) -> MaeTeacher:
    """Tiny MAE-style ViT for tests and demos: dim 64, depth 2, 2 heads, MLP ratio 2."""
    return _build(img_size, dict(patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                 mlp_ratio=2.0), kwargs)


@register_teacher
def mae_vit_mini_patch16(img_size: int = 224, **kwargs: Any) -> MaeTeacher:
    """Demo-size MAE ViT (dim 128, depth 4, 4 heads): pre-trainable on CPU in about a minute."""
    return _build(img_size, dict(patch_size=16, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0), kwargs)
