"""uint8 images -> the normalised float input a network expects (one owner for mean/std maths).

Two spellings exist and give results that differ in the last bit, so each caller keeps its own:
the training/extraction path subtracts ``mean * 255`` and divides by ``std * 255``
(``pixel_stats`` + ``normalize_uint8``); dense evaluation scales to [0, 1] first
(``normalize_unit``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

__all__ = ["IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "pixel_stats", "normalize_uint8", "normalize_unit"]


def pixel_stats(mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` on the uint8 scale (times 255), shaped (1, 3, 1, 1) for ``normalize_uint8``."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize_uint8(images_bchw: Tensor, mean_255: Tensor, std_255: Tensor) -> Tensor:
    """uint8-valued (B, 3, H, W) images -> ``(x - mean*255) / (std*255)`` in float32 (stats from ``pixel_stats``)."""
    return (images_bchw.float() - mean_255) / std_255


def normalize_unit(image_u8: Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Tensor:
    """uint8 (..., 3, H, W) -> ``(x / 255 - mean) / std`` in float32 (dense evaluation's order)."""
    return (image_u8.float() / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
