"""Small tensor helpers shared by the teachers: fixed 2D sin-cos position embeddings and
the gather/scatter that moves tokens between the full patch grid and its visible subset.

Masks follow one convention everywhere: ``mask_bn`` is bool, True = patch masked (hidden).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def sincos_pos_embed_2d(
    grid_size: tuple[int, int],
    dim: int,
    first_axis: Literal["col", "row"],
    temperature: float = 10000.0,
) -> Tensor:
    """Fixed 2D sin-cos position embedding with a zero slot for the cls token, ``(1, 1+N, dim)``.

    Each quarter of the channels holds ``sin`` or ``cos`` of one patch coordinate times the
    frequencies ``temperature ** (-k / (dim / 4))``; the two halves differ only in which
    coordinate comes first. MAE (He et al. 2022, ``util/pos_embed.py``) puts the column
    coordinate first, CAE (Chen et al. 2022, ``build_2d_sincos_position_embedding``) the row
    coordinate (for the square grids both use). Patches are numbered row-major, like
    ``PatchEmbed``'s ``flatten(2)``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size[0], dtype=torch.float64),
        torch.arange(grid_size[1], dtype=torch.float64),
        indexing="ij",
    )
    first, second = (cols, rows) if first_axis == "col" else (rows, cols)
    omega = temperature ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out_first = first.flatten()[:, None] * omega[None]
    out_second = second.flatten()[:, None] * omega[None]
    emb_nd = torch.cat(
        [out_first.sin(), out_first.cos(), out_second.sin(), out_second.cos()], dim=1
    )
    emb_nd = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb_nd], dim=0)
    return emb_nd.float().unsqueeze(0)


def visible_counts(mask_bn: Tensor) -> Tensor:
    """Number of visible (unmasked) patches per sample, shape ``(B,)``."""
    return (~mask_bn).sum(dim=1)


def split_indices(mask_bn: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of visible and of masked patches, each in ascending order.

    Requires every sample to have the same number of visible patches (the caller falls back
    to a per-sample loop otherwise). Returns ``(ids_visible_bv, ids_masked_bm)``.
    """
    counts = visible_counts(mask_bn)
    if bool((counts != counts[0]).any()):
        raise ValueError("split_indices needs the same number of visible patches per sample")
    order_bn = torch.argsort(mask_bn.to(torch.uint8), dim=1, stable=True)
    num_visible = int(counts[0])
    return order_bn[:, :num_visible], order_bn[:, num_visible:]


def gather_tokens(x_bnc: Tensor, ids_bk: Tensor) -> Tensor:
    """Pick tokens ``x_bnc[b, ids_bk[b, k]]``, shape ``(B, K, C)``."""
    return torch.gather(x_bnc, 1, ids_bk.unsqueeze(-1).expand(-1, -1, x_bnc.shape[-1]))


def scatter_tokens(out_bnc: Tensor, ids_bk: Tensor, src_bkc: Tensor) -> Tensor:
    """Write ``src_bkc`` into ``out_bnc`` at positions ``ids_bk`` (out of place)."""
    index = ids_bk.unsqueeze(-1).expand(-1, -1, out_bnc.shape[-1])
    return out_bnc.scatter(1, index, src_bkc.to(out_bnc.dtype))
