"""Views and patch masks, re-creatable bit-for-bit from what the cache stores.

H-GKD feeds the student exactly the masked view the teacher saw (method notes, "Views and
masks"): ViT features are not crop/flip-equivariant, so the crop box, the flip and the patch
mask are drawn once, deterministically from ``(seed, sample key, view index)``, stored with
the teacher output, and re-applied to the source image in stage two (``render_view``).
This module is the one place both stages import for that; the recipe itself,
:class:`ViewConfig`, lives torch-free in ``view_config.py`` (its defaults feed ``--help``).
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .view_config import ViewConfig


@dataclass(frozen=True)
class ViewParams:
    """Everything that defines one view of one image."""

    crop_tlhw: tuple[int, int, int, int]  # top, left, height, width in source pixels
    flip: bool
    mask_hw: np.ndarray  # (grid, grid) bool on the teacher's patch grid; True = hidden


def view_rng(seed: int, key: str, view_index: int) -> np.random.Generator:
    """Independent generator per view: same (seed, key, k) -> same view on any machine."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{view_index}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def sample_crop(rng: np.random.Generator, height: int, width: int, cfg: ViewConfig) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (Szegedy et al.; torchvision's algorithm) from ``rng``."""
    area = height * width
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop clipped to the ratio range
    if in_ratio < cfg.ratio[0]:
        w, h = width, int(round(width / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        h, w = height, int(round(height * cfg.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_mask(rng: np.random.Generator, cfg: ViewConfig) -> np.ndarray:
    """Random patch mask with exactly round(ratio * cells) hidden cells, on the patch grid."""
    cells_side = cfg.img_size // cfg.mask_granularity
    n_cells = cells_side * cells_side
    hidden = rng.permutation(n_cells)[: int(round(cfg.mask_ratio * n_cells))]
    cells = np.zeros(n_cells, dtype=bool)
    cells[hidden] = True
    rep = cfg.mask_granularity // cfg.patch_size
    return cells.reshape(cells_side, cells_side).repeat(rep, 0).repeat(rep, 1)


def sample_view(cfg: ViewConfig, key: str, view_index: int, src_hw: tuple[int, int]) -> ViewParams:
    """Draw the crop, flip and mask of view ``view_index`` of sample ``key``."""
    rng = view_rng(cfg.seed, key, view_index)
    crop = sample_crop(rng, src_hw[0], src_hw[1], cfg)
    flip = bool(rng.random() < cfg.hflip)
    return ViewParams(crop, flip, sample_mask(rng, cfg))


def student_mask(cfg: ViewConfig, seed: int, key: str, epoch: int) -> np.ndarray:
    """A fresh student mask for ``epoch`` (issue 12, ``--student-mask fresh``): the cache's mask
    ratio and granularity, drawn from ``(seed, key, epoch)`` on a stream tagged apart from
    :func:`view_rng`'s, so it is independent of every view's own crop, flip and mask."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{epoch}\0student-mask".encode(), digest_size=16).digest()
    return sample_mask(np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little"))), cfg)


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor (3, H, W); raises on undecodable data.

    The tensor is a view of the decoded (H, W, 3) array (channels-last memory): one copy
    instead of three, and ``render_view`` gives the same pixels from either layout (issue 13,
    P2c; checked in ``tests/test_decode.py``). JPEG draft (reduced-size) decoding is not used:
    it changes pixels, and a 224-px view of an ImageNet-sized (~500x375) image never allows it."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        array_hwc = np.array(rgb)  # decodes; a writable copy of PIL's buffer
    return torch.from_numpy(array_hwc).permute(2, 0, 1)


def render_view(image_chw: torch.Tensor, params: ViewParams, cfg: ViewConfig) -> torch.Tensor:
    """Apply a stored view to the decoded source image: uint8 (3, img_size, img_size)."""
    top, left, h, w = params.crop_tlhw
    mode = InterpolationMode(cfg.interpolation)
    view = TF.resized_crop(image_chw, top, left, h, w, [cfg.img_size, cfg.img_size], interpolation=mode, antialias=True)
    return view.flip(-1) if params.flip else view


def mask_to_pixels(mask_hw: np.ndarray | torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch mask (..., h, w) -> pixel mask (..., h*p, w*p), True = hidden."""
    mask = torch.as_tensor(mask_hw)
    return mask.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)
