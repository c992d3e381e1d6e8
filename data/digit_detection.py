"""The embedded detection set: COCO-format train/val canvases made from the shipped digit scans.

scikit-learn ships 1,797 labelled 8x8 handwritten digit scans (no download). Each canvas is a
``canvas`` x ``canvas`` RGB image with 2-5 digits pasted at random scales (``scale`` px, the
scan upsampled bicubically) and positions, boxes never touching; each digit takes a random
colour over a noisy background of random brightness. An instance's mask is its own ink (the
upsampled scan above ``INK`` of full intensity), its box the tight box of that mask, its
category the digit (ten categories, ids 1-10, names "0"-"9"). Train and val canvases draw from
disjoint scans: the same split as the classification demo's ``digits-train`` / ``digits-test``
shards (``hgkd.data.demo_data.write_digits_shards``: seed 0, a quarter held out), so a student
distilled on the demo's training split never saw a val digit.

Written once, deterministically from ``seed``: COCO instances JSON (``train.json``, ``val.json``;
masks as compressed RLE, which COCO allows for any instance) and PNG folders (``train/``,
``val/``). A folder that already holds the set made with the same settings is reused; every
file is written under a temporary name and renamed, so torchrun's ranks may all make it at once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

INK = 0.35  # an upsampled scan pixel at >= 35% of full intensity is ink (the instance's mask)
SPLITS = ("train", "val")
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
BUILTIN = "builtin:digit-detection"  # data spec of the set: ``builtin:digit-detection-train`` / ``-val``


def digit_scans(seed: int = 0, test_fraction: float = 0.25) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The scans (N, 8, 8) in [0, 1] and digits (N,) of each split, split as ``write_digits_shards``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    n_test = int(round(test_fraction * len(order)))
    scans = (digits.images / 16.0).clip(0, 1)
    return {"train": (scans[order[n_test:]], digits.target[order[n_test:]]),
            "val": (scans[order[:n_test]], digits.target[order[:n_test]])}


def write_digit_detection(out_dir: str | Path, n_train: int = 256, n_val: int = 64, canvas: int = 128,
                          scale: tuple[int, int] = (24, 56), per_canvas: tuple[int, int] = (2, 5),
                          seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write (or reuse) the set under ``out_dir``; returns ``{split: (annotation JSON, image folder)}``."""
    out = Path(out_dir)
    settings = {"n_train": n_train, "n_val": n_val, "canvas": canvas, "scale": list(scale),
                "per_canvas": list(per_canvas), "seed": seed, "ink": INK}
    paths = {split: (str(out / f"{split}.json"), str(out / split)) for split in SPLITS}
    if all(_made_with(Path(ann), settings) for ann, _ in paths.values()):
        return paths
    scans = digit_scans()
    for split_id, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        images_dir = out / split
        images_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, split_id])
        images, annotations = [], []
        for image_id in range(1, count + 1):
            pixels, instances = _canvas(rng, *scans[split], canvas, scale, per_canvas)
            name = f"{image_id:06d}.png"
            _atomic(images_dir / name, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
            images.append({"id": image_id, "file_name": name, "width": canvas, "height": canvas})
            for digit, mask in instances:
                annotations.append(_annotation(len(annotations) + 1, image_id, digit, mask))
        blob = {"info": {"description": "hgkd embedded digit detection set", "settings": settings},
                "images": images, "annotations": annotations, "categories": CATEGORIES}
        _atomic(Path(paths[split][0]), lambda tmp: tmp.write_text(json.dumps(blob)))
    return paths


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary name and rename: ranks making the set at once never read a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _made_with(annotations: Path, settings: dict) -> bool:
    try:
        return json.loads(annotations.read_text())["info"]["settings"] == settings
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _canvas(rng: np.random.Generator, scans: np.ndarray, digits: np.ndarray, canvas: int,
            scale: tuple[int, int], per_canvas: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One uint8 (canvas, canvas, 3) image and its instances (digit, bool mask)."""
    background = rng.uniform(0, 90) + rng.normal(0, 12, (canvas, canvas, 1)) + rng.normal(0, 6, (canvas, canvas, 3))
    image = background.astype(np.float64)
    instances: list[tuple[int, np.ndarray]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(per_canvas[0], per_canvas[1] + 1))):
        size = int(rng.integers(scale[0], scale[1] + 1))
        for _try in range(30):
            top, left = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
            if all(top >= b + 2 or top + size + 2 <= t or left >= r + 2 or left + size + 2 <= l
                   for t, l, b, r in boxes):
                break
        else:
            continue  # no free place for this size
        pick = int(rng.integers(len(scans)))
        alpha = np.asarray(Image.fromarray((scans[pick] * 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC), np.float64) / 255.0
        colour = rng.uniform(140, 255, 3)
        region = image[top:top + size, left:left + size]
        region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((canvas, canvas), bool)
        mask[top:top + size, left:left + size] = alpha >= INK
        if mask.any():
            boxes.append((top, left, top + size, left + size))
            instances.append((int(digits[pick]), mask))
    return image.clip(0, 255).astype(np.uint8), instances


def _annotation(ann_id: int, image_id: int, digit: int, mask: np.ndarray) -> dict:
    """A COCO instance: compressed-RLE mask, tight [x, y, w, h] box of the mask, mask area."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return {"id": ann_id, "image_id": image_id, "category_id": digit + 1, "iscrowd": 0, "area": int(mask.sum()),
            "bbox": box, "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}}
