"""CAE teacher (Chen et al. 2022, "Context Autoencoder for Self-Supervised Representation
Learning"); H-GKD's default teacher (Sec. 4.1). CAE is not in timm, so it is built here.

Architecture (CAE Sec. 3): a ViT encoder with BEiT-style blocks (layer scale, q/v bias, no
relative position bias) and a fixed 2D sin-cos position embedding runs on the visible
patches only. The latent contextual regressor then predicts the representations of the
masked patches: each of its cross-attention blocks takes the mask-token queries (+ their
position embeddings) and attends to keys [visible latents + pos, current queries + pos] and
values [visible latents, current queries]; a final LayerNorm gives the predictions.
As a teacher (H-GKD Sec. 3.1) the output is the encoder's tokens at visible positions and
the regressor's predictions at masked positions, so all N tokens are valid. If the
regressor is narrower than the encoder (``encoder_to_regressor`` projection), every token
is given in the regressor's space, where CAE aligns predictions with encoder outputs.

Checkpoint layout, confirmed by reading the official PyTorch code (lxtGH/CAE and its
successor Atten4Vis/CAE, ``models/modeling_cae.py`` + ``models/modeling_cae_helper.py``):
  encoder: ``encoder.{cls_token, pos_embed, patch_embed.proj.*, norm.*}`` and
    ``encoder.blocks.N.{norm1, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj, norm2,
    mlp.fc1, mlp.fc2, gamma_1, gamma_2}`` (same names as timm's BEiT block);
  regressor: ``<R>.regressor_blocks.N.{norm1_q, norm1_k, norm1_v, norm2_cross,
    cross_attn.{q,k,v}.weight, cross_attn.{q_bias,v_bias}, cross_attn.proj, mlp_cross.fc1,
    mlp_cross.fc2, gamma_1_cross, gamma_2_cross}`` and ``<R>.norm``, with ``<R>`` =
    ``pretext_neck`` (lxtGH) or ``regresser`` (Atten4Vis); top-level ``mask_token``;
    optional ``encoder_to_decoder``/``encoder_to_regresser`` (+ ``_norm``) projection;
  dropped: the alignment copy of the encoder (``teacher.*`` / ``alignment_encoder.*``), the
    decoder (``<R>.decoder_blocks.*, <R>.norm2, <R>.head`` or ``decoder.*``) and
    ``rd_pos_embed`` (recomputed: it is the same fixed table).
Assumed, not confirmed: ``regressor_and_decoder.`` as a further alias of ``<R>`` (the prefix
of PaddlePaddle/VIMER's CAE, whose ``.pdparams`` files are not loadable here), and which
regressor width the released ``cae_large_1600ep.pth`` has. The large script asks for a
1024-d, 16-head regressor (the default here), but a missing line continuation in it would
leave the 768-d, 12-head default; such a file fails to load with a ``mask_token`` shape
mismatch and needs ``regressor_dim=768, regressor_heads=12``.
CAE pre-trains with the ImageNet mean/std, the default here.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, Mlp, PatchEmbed, trunc_normal_
from timm.models.beit import Block as BeitBlock
from torch import Tensor, nn

from .base import StateDict, Teacher, register_teacher
from .layers import gather_tokens, scatter_tokens, sincos_pos_embed_2d, split_indices

REGRESSOR_ALIASES = ("pretext_neck.", "regresser.", "regressor_and_decoder.")
PROJECTION_ALIASES = ("encoder_to_decoder", "encoder_to_regresser")
DROPPED_PREFIXES = ("teacher.", "teacher_network.", "alignment_encoder.", "decoder.",
                    "rd_pos_embed", "regressor.decoder_blocks.", "regressor.norm2.",
                    "regressor.head.")


def checkpoint_filter_fn(state_dict: StateDict, model: "CaeTeacher") -> StateDict:
    """Map an official CAE pre-training checkpoint onto :class:`CaeTeacher`.

    Renames the regressor prefix (``pretext_neck.``/``regresser.``/``regressor_and_decoder.``)
    to ``regressor.`` and the projection to ``encoder_to_regressor``; drops the alignment
    encoder copy, the pixel/token decoder and ``rd_pos_embed``. A fixed sin-cos
    ``encoder.pos_embed`` of another grid size is regenerated for the model's grid.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        key = _rename(key)
        if not key.startswith(DROPPED_PREFIXES):
            out[key] = value
    pos = out.get("encoder.pos_embed")
    if pos is not None and pos.shape != model.encoder.pos_embed.shape:
        out["encoder.pos_embed"] = model.encoder.pos_embed.detach().clone()
    return out


def _rename(key: str) -> str:
    for alias in REGRESSOR_ALIASES:
        if key.startswith(alias):
            return "regressor." + key[len(alias):]
    for alias in PROJECTION_ALIASES:
        if key.startswith(alias):
            return "encoder_to_regressor" + key[len(alias):]
    return key


class CaeEncoder(nn.Module):
    """CAE's ViT encoder, run on visible patches only (BEiT blocks, fixed sin-cos pos)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, init_values: float) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_pos_embed_2d(self.patch_embed.grid_size, embed_dim, "row")
        self.register_buffer("pos_embed", pos)  # a frozen parameter in the official code
        self.blocks = nn.ModuleList([
            BeitBlock(embed_dim, num_heads, qkv_bias=True, mlp_ratio=mlp_ratio,
                      init_values=init_values, norm_layer=LayerNorm)
            for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)

    def forward(self, images_bchw: Tensor, ids_visible_bv: Tensor) -> Tensor:
        """Latents of the visible patches ``(B, V, C)`` (cls token dropped)."""
        x_bnc = self.patch_embed(images_bchw) + self.pos_embed[:, 1:]
        visible_bvc = gather_tokens(x_bnc, ids_visible_bv)
        cls_b1c = (self.cls_token + self.pos_embed[:, :1]).expand(visible_bvc.shape[0], -1, -1)
        x = torch.cat([cls_b1c, visible_bvc], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


class CrossAttention(nn.Module):
    """Multi-head cross-attention with CAE's bias layout (q and v biases, none on k)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, query_bnc: Tensor, key_bmc: Tensor, value_bmc: Tensor) -> Tensor:
        q = F.linear(query_bnc, self.q.weight, self.q_bias)
        k = F.linear(key_bmc, self.k.weight)
        v = F.linear(value_bmc, self.v.weight, self.v_bias)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).flatten(2))


class RegressorBlock(nn.Module):
    """One latent-regressor block: pre-norm cross-attention, LayerNorm, MLP; layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float) -> None:
        super().__init__()
        self.norm1_q = LayerNorm(dim)
        self.norm1_k = LayerNorm(dim)
        self.norm1_v = LayerNorm(dim)
        self.norm2_cross = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp_cross = Mlp(dim, int(dim * mlp_ratio))
        scale = init_values if init_values > 0 else 1.0  # official: fixed ones when disabled
        self.gamma_1_cross = nn.Parameter(torch.full((dim,), scale))
        self.gamma_2_cross = nn.Parameter(torch.full((dim,), scale))

    def forward(self, query_bmc: Tensor, context_bkc: Tensor,
                pos_query_bmc: Tensor, pos_context_bkc: Tensor) -> Tensor:
        attended = self.cross_attn(self.norm1_q(query_bmc + pos_query_bmc),
                                   self.norm1_k(context_bkc + pos_context_bkc),
                                   self.norm1_v(context_bkc))
        x = self.norm2_cross(query_bmc + self.gamma_1_cross * attended)
        return x + self.gamma_2_cross * self.mlp_cross(x)


class LatentRegressor(nn.Module):
    """CAE's latent contextual regressor: predicts masked latents from visible ones."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 init_values: float) -> None:
        super().__init__()
        self.regressor_blocks = nn.ModuleList([
            RegressorBlock(dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = LayerNorm(dim)

    def forward(self, queries_bmc: Tensor, visible_bvc: Tensor,
                pos_masked_bmc: Tensor, pos_visible_bvc: Tensor) -> Tensor:
        pos_context = torch.cat([pos_visible_bvc, pos_masked_bmc], dim=1)
        for block in self.regressor_blocks:
            context = torch.cat([visible_bvc, queries_bmc], dim=1)
            queries_bmc = block(queries_bmc, context, pos_masked_bmc, pos_context)
        return self.norm(queries_bmc)


class CaeTeacher(Teacher):
    """Frozen CAE encoder + latent regressor; all N output tokens are valid."""

    family = "cae"
    outputs_masked_tokens = True
    visible_only = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-5,
        regressor_depth: int = 4,
        regressor_dim: int | None = None,
        regressor_heads: int | None = None,
        regressor_init_values: float | None = None,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        regressor_dim = regressor_dim or embed_dim
        if regressor_heads is None:
            same_width = regressor_dim == embed_dim
            regressor_heads = num_heads if same_width else max(1, regressor_dim // 64)
        self.encoder = CaeEncoder(img_size, patch_size, embed_dim, depth, num_heads,
                                  mlp_ratio, init_values)
        if regressor_dim != embed_dim:
            self.encoder_to_regressor = nn.Linear(embed_dim, regressor_dim)
            self.encoder_to_regressor_norm = LayerNorm(regressor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, regressor_dim))
        self.regressor = LatentRegressor(
            regressor_dim, regressor_depth, regressor_heads, mlp_ratio,
            init_values if regressor_init_values is None else regressor_init_values)
        pos = sincos_pos_embed_2d(self.encoder.patch_embed.grid_size, regressor_dim, "row")
        self.register_buffer("regressor_pos_embed", pos, persistent=False)
        self._set_teacher_attrs(img_size, patch_size, regressor_dim, mean, std)
        self._init_weights()

    def _init_weights(self) -> None:
        """Random init (no checkpoint): truncated normal 0.02 for weights and tokens."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        trunc_normal_(self.encoder.cls_token, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self)

    def _to_regressor_space(self, latent_bvc: Tensor) -> Tensor:
        if not hasattr(self, "encoder_to_regressor"):
            return latent_bvc
        return self.encoder_to_regressor_norm(self.encoder_to_regressor(latent_bvc))

    def _forward_masked(self, images_bchw: Tensor, mask_bn: Tensor | None) -> tuple[Tensor, Tensor]:
        batch, num_patches = images_bchw.shape[0], self.num_patches
        if mask_bn is None:
            mask_bn = torch.zeros(batch, num_patches, dtype=torch.bool, device=images_bchw.device)
        ids_visible_bv, ids_masked_bm = split_indices(mask_bn)
        visible_bvc = self._to_regressor_space(self.encoder(images_bchw, ids_visible_bv))
        tokens_bnc = visible_bvc.new_zeros(batch, num_patches, visible_bvc.shape[-1])
        tokens_bnc = scatter_tokens(tokens_bnc, ids_visible_bv, visible_bvc)
        if ids_masked_bm.shape[1] > 0:
            predicted_bmc = self._regress(visible_bvc, ids_visible_bv, ids_masked_bm)
            tokens_bnc = scatter_tokens(tokens_bnc, ids_masked_bm, predicted_bmc)
        valid_bn = torch.ones(batch, num_patches, dtype=torch.bool, device=tokens_bnc.device)
        return tokens_bnc, valid_bn

    def _regress(
        self, visible_bvc: Tensor, ids_visible_bv: Tensor, ids_masked_bm: Tensor
    ) -> Tensor:
        """Latent predictions for the masked positions, ``(B, M, C)``."""
        batch = visible_bvc.shape[0]
        pos_bnc = self.regressor_pos_embed[:, 1:].to(visible_bvc.dtype).expand(batch, -1, -1)
        num_masked = ids_masked_bm.shape[1]
        queries_bmc = self.mask_token.to(visible_bvc.dtype).expand(batch, num_masked, -1)
        return self.regressor(queries_bmc, visible_bvc, gather_tokens(pos_bnc, ids_masked_bm),
                              gather_tokens(pos_bnc, ids_visible_bv))


def _build(img_size: int, defaults: dict[str, Any], kwargs: dict[str, Any]) -> CaeTeacher:
    return CaeTeacher(img_size=img_size, **{**defaults, **kwargs})


@register_teacher
def cae_large_patch16(img_size: int = 224, **kwargs: Any) -> CaeTeacher:
    """CAE ViT-L/16 (official ``cae_large_1600ep.pth``): dim 1024, depth 24, 16 heads, layer
    scale 1e-5; regressor depth 4, width 1024, 16 heads."""
    return _build(img_size, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                 init_values=1e-5, regressor_depth=4), kwargs)


@register_teacher
def cae_tiny_patch16(img_size: int = 224, **kwargs: Any) -> CaeTeacher:
    """Tiny CAE for tests and demos: dim 64, depth 2, 2 heads, MLP ratio 2, regressor depth 1."""
    return _build(img_size, dict(patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                 mlp_ratio=2.0, init_values=0.1, regressor_depth=1), kwargs)
