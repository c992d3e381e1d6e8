"""``decode_image`` (issue 13, P2c): one copy, channels-last memory, and exactly the pixels and
rendered views of the previous contiguous decode, for every image mode a data set may hold."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hgkd.extract.demo_data import SKIMAGE_IMAGES, _load
from hgkd.extract.views import ViewConfig, decode_image, render_view, sample_view


def reference_decode(data: bytes) -> torch.Tensor:
    """The decode this replaced: convert to RGB, copy, contiguous (3, H, W)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def encoded(image: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    pil = Image.fromarray(image)
    pil = pil.convert(mode) if mode else pil
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


CASES = {
    "rgb-jpeg": ("astronaut", "JPEG", None),
    "gray-jpeg": ("camera", "JPEG", None),
    "cmyk-jpeg": ("coffee", "JPEG", "CMYK"),
    "rgba-png": ("chelsea", "PNG", "RGBA"),
    "palette-png": ("rocket", "PNG", "P"),
}


@pytest.mark.parametrize("case", CASES)
def test_decode_and_rendered_views_equal_the_contiguous_decode(case):
    name, fmt, mode = CASES[case]
    data = encoded(_load(name), fmt, mode)
    image, reference = decode_image(data), reference_decode(data)
    assert image.dtype == torch.uint8 and image.shape == reference.shape and image.shape[0] == 3
    assert torch.equal(image, reference)
    for img_size, interpolation in ((224, "bicubic"), (64, "bicubic"), (96, "bilinear")):
        cfg = ViewConfig(img_size=img_size, interpolation=interpolation, mask_granularity=32)
        for k in range(8):
            params = sample_view(cfg, name, k, tuple(image.shape[1:]))
            assert torch.equal(render_view(image, params, cfg), render_view(reference, params, cfg)), (img_size, k)


def test_undecodable_bytes_still_raise():
    data = encoded(_load("astronaut"), "JPEG")
    with pytest.raises(Exception):
        decode_image(data[: len(data) // 2])
    with pytest.raises(Exception):
        decode_image(b"not an image")
    assert SKIMAGE_IMAGES  # the bundled photos are the fixtures
