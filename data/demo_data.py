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


def write_digits_shards(out_dir: str | Path, img_size: int = 64, test_fraction: float = 0.25,
                        per_shard: int = 512, seed: int = 0, max_images: int | None = None) -> tuple[str, str]:
    """scikit-learn's bundled handwritten digits (1,797 labelled 8x8 scans) as RGB PNGs.

    Upsampled to ``img_size``; a fixed stratified-by-shuffle split. Returns the brace
    patterns of the train and test shards (``digits-train-*.tar``, ``digits-test-*.tar``).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))[:max_images]
    n_test = int(round(test_fraction * len(order)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patterns = []
    for split, idx in (("train", order[n_test:]), ("test", order[:n_test])):
        n_shards = -(-len(idx) // per_shard)
        for s in range(n_shards):
            with wds.TarWriter(str(out / f"digits-{split}-{s:03d}.tar")) as sink:
                for i in idx[s * per_shard : (s + 1) * per_shard]:
                    big = Image.fromarray(images[i]).resize((img_size, img_size), Image.BICUBIC).convert("RGB")
                    buf = io.BytesIO()
                    big.save(buf, format="PNG")
                    sink.write({"__key__": f"digits/{i:04d}", "png": buf.getvalue(), "cls": str(int(digits.target[i]))})
        patterns.append(str(out / f"digits-{split}-{{000..{n_shards - 1:03d}}}.tar"))
    return patterns[0], patterns[1]
