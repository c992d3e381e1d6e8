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
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .view_config import ViewConfig

# torchvision 0.29 announces the end of torchvision.io's image decoding (for TorchCodec) on every
# call; decode_jpeg is the libjpeg-turbo/nvJPEG decoder this project depends on until then.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


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


def is_jpeg(data: bytes) -> bool:
    """JPEG start-of-image marker."""
    return data[:3] == b"\xff\xd8\xff"


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor (3, H, W); raises on undecodable data. The
    ``"pil"`` decoder of ``hgkd.data.decoders``.

    JPEGs are decoded by torchvision's libjpeg-turbo (``decode_jpeg`` on the CPU): the same
    pixels as Pillow's decode for every subsampling, progressive, grayscale and CMYK file
    (``tests/test_decode.py``) at ~1.2-1.4x its speed (issue 20, item 3); other formats by
    Pillow. Both return channels-last memory (one copy; ``render_view`` gives the same pixels
    from either layout, issue 13). Reduced-size (DCT-scaled) and cropped decodes are not used:
    the first changes pixels, the second is equal only with a margin and gained 10-20%."""
    if is_jpeg(data):
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # what libjpeg-turbo refuses (truncated, corrupt) Pillow may name better
            pass
    with Image.open(io.BytesIO(data)) as img:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        array_hwc = np.array(rgb)  # decodes; a writable copy of PIL's buffer
    return torch.from_numpy(array_hwc).permute(2, 0, 1)


def render_crop(image_chw: torch.Tensor, crop_tlhw: tuple[int, int, int, int], flip: bool, img_size: int,
                interpolation: str) -> torch.Tensor:
    """Crop, resize (antialiased) and flip a decoded image on its device: uint8 (3, img_size, img_size)."""
    top, left, h, w = crop_tlhw
    view = TF.resized_crop(image_chw, top, left, h, w, [img_size, img_size], interpolation=InterpolationMode(interpolation),
                           antialias=True)
    return view.flip(-1) if flip else view


def render_view(image_chw: torch.Tensor, params: ViewParams, cfg: ViewConfig) -> torch.Tensor:
    """Apply a stored view to the decoded source image: uint8 (3, img_size, img_size)."""
    return render_crop(image_chw, params.crop_tlhw, params.flip, cfg.img_size, cfg.interpolation)


def mask_to_pixels(mask_hw: np.ndarray | torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch mask (..., h, w) -> pixel mask (..., h*p, w*p), True = hidden."""
    mask = torch.as_tensor(mask_hw)
    return mask.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)
