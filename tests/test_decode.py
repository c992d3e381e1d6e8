"""``decode_image`` (issue 13, P2c; issue 20): one copy, channels-last memory, and exactly the
pixels and rendered views of Pillow's contiguous decode, for every image mode a data set may hold
(JPEGs go through torchvision's libjpeg-turbo: every chroma subsampling, progressive, gray, CMYK)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hgkd.data.views import ViewConfig, decode_image, render_view, sample_view


def photo(height: int, width: int, gray: bool = False, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 content: smooth colour field, texture, hard edges, noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(small.resize((width, height), Image.BICUBIC), np.float32) + rng.normal(0, 12, (height, width, 3))
    pixels[height // 4 : height // 2, width // 3 : width // 2] += 60
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    return image.mean(-1).astype(np.uint8) if gray else image


def reference_decode(data: bytes) -> torch.Tensor:
    """The decode this replaced: convert to RGB, copy, contiguous (3, H, W)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


JPEG_VARIANTS = {"JPEG": {}, "JPEG-444": {"subsampling": 0}, "JPEG-422": {"subsampling": 1},
                 "JPEG-progressive": {"progressive": True}}


def encoded(image: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    pil = Image.fromarray(image)
    pil = pil.convert(mode) if mode else pil
    buf = io.BytesIO()
    if fmt in JPEG_VARIANTS:
        pil.save(buf, format="JPEG", quality=90, **JPEG_VARIANTS[fmt])
    else:
        pil.save(buf, format=fmt)
    return buf.getvalue()


CASES = {  # name: (height, width, gray, format, PIL mode to save in)
    "rgb-jpeg": (375, 500, False, "JPEG", None),
    "rgb-jpeg-444": (375, 500, False, "JPEG-444", None),
    "rgb-jpeg-422": (333, 500, False, "JPEG-422", None),
    "rgb-jpeg-progressive": (500, 375, False, "JPEG-progressive", None),
    "gray-jpeg": (333, 500, True, "JPEG", None),
    "cmyk-jpeg": (500, 375, False, "JPEG", "CMYK"),
    "rgba-png": (240, 320, False, "PNG", "RGBA"),
    "palette-png": (300, 280, False, "PNG", "P"),
}


@pytest.mark.parametrize("case", CASES)
def test_decode_and_rendered_views_equal_the_contiguous_decode(case):
    height, width, gray, fmt, mode = CASES[case]
    data = encoded(photo(height, width, gray), fmt, mode)
    image, reference = decode_image(data), reference_decode(data)
    assert image.dtype == torch.uint8 and image.shape == reference.shape and image.shape[0] == 3
    assert torch.equal(image, reference)
    for img_size, interpolation in ((224, "bicubic"), (64, "bicubic"), (96, "bilinear")):
        cfg = ViewConfig(img_size=img_size, interpolation=interpolation, mask_granularity=32)
        for k in range(8):
            params = sample_view(cfg, case, k, tuple(image.shape[1:]))
            assert torch.equal(render_view(image, params, cfg), render_view(reference, params, cfg)), (img_size, k)


def test_undecodable_bytes_still_raise():
    data = encoded(photo(120, 160), "JPEG")
    with pytest.raises(Exception):
        decode_image(data[: len(data) // 2])
    with pytest.raises(Exception):
        decode_image(b"not an image")
