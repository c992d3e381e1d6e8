"""The embedded default data set: scikit-image's bundled photographs as webdataset shards.

scikit-image ships these images inside its wheel (no download), so the README's main job
runs on a fresh machine with real photos. Grayscale images are stored as they are; the
decoder converts them to RGB like any other source image.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

# Photographs and micrographs that scikit-image bundles in its wheel.
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "text", "cell",
)


def _load(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-9))).astype(np.uint8)
    return image[..., :3] if image.ndim == 3 else image


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_demo_shards(out_dir: str | Path, num_shards: int = 2) -> str:
    """Write the bundled photos as ``demo-{000..N-1}.tar``; returns the brace pattern."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(SKIMAGE_IMAGES)
    per_shard = -(-len(names) // num_shards)
    for shard in range(num_shards):
        with wds.TarWriter(str(out / f"demo-{shard:03d}.tar")) as sink:
            for i, name in enumerate(names[shard * per_shard : (shard + 1) * per_shard]):
                label = shard * per_shard + i
                sink.write({"__key__": f"skimage/{name}", "jpg": _jpeg(_load(name)), "cls": str(label)})
    return str(out / f"demo-{{000..{num_shards - 1:03d}}}.tar")
