"""COCO-format detection data: an instances annotation JSON plus an image folder, read image by image.

What COCO 2017 ships (``annotations/instances_train2017.json`` + ``train2017/``) and most custom
detection sets copy (format: https://cocodataset.org/#format-data). Both may be local paths or
fsspec URLs (``hgkd.remote``). The JSON is parsed once and checked before any training: its
structure, every annotation's image and category, every box, polygon and RLE, and that every
image file is in the folder (one listing) - each problem is one ``HgkdError`` line.

``CocoSet.dataset()`` gives a ``Dataset`` whose items a DataLoader's workers read and decode
(nothing decoded is kept): a float image in [0, 1] (3, H, W) at its stored size - the detector's
own transform resizes it (torchvision's ``GeneralizedRCNNTransform``) - and torchvision's target
dict (``boxes`` x1y1x2y2, ``labels`` 1..K, ``masks`` (N, H, W) uint8 from pycocotools). Crowd
annotations are handled as COCO does: left out of the training targets (torchvision's and
detectron2's COCO loaders), kept in the ground truth that ``COCOeval`` matches, where a
detection on a crowd region is ignored. Training also leaves out boxes without area and images
with no instance left (detectron2's ``FILTER_EMPTY_ANNOTATIONS``). Category ids are mapped to
contiguous labels in id order (label = index + 1; 0 is the background).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data.views import decode_image, view_rng
from ..errors import HgkdError
from ..remote import is_url, remote_errors, url_fs

REQUIRED = ("images", "annotations", "categories")


@dataclass
class CocoSet:
    """One COCO-format split: the parsed JSON (checked), where its images are, and its label map."""

    annotations: str  # the JSON's path or URL
    images_root: str
    blob: dict[str, Any] = field(repr=False)  # the JSON as parsed (ground truth for COCOeval)
    image_ids: list[int]  # the images this set reads, in the JSON's order
    category_ids: list[int]  # sorted; label i + 1 is category_ids[i]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def name(self) -> str:
        return self.annotations

    def coco(self) -> Any:
        """A pycocotools ``COCO`` index of the ground truth (all images, crowds included)."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        gt = COCO()
        gt.dataset = self.blob
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt

    def for_training(self, option: str = "--train") -> "CocoSet":
        """Only the images with at least one non-crowd instance with a box of positive area."""
        keep = {a["image_id"] for a in self.blob["annotations"] if _trainable(a)}
        ids = [i for i in self.image_ids if i in keep]
        if not ids:
            raise HgkdError(f"{option} {self.annotations}: no training annotations (every instance is a crowd or "
                            f"has an empty box, in {len(self.image_ids)} images)")
        return replace(self, image_ids=ids)

    def dataset(self, masks: bool, train: bool = False, seed: int = 0, flip: float = 0.5) -> "CocoDetection":
        return CocoDetection(self, masks, train, seed, flip)


def _trainable(ann: dict) -> bool:
    return not ann.get("iscrowd", 0) and ann["bbox"][2] > 0 and ann["bbox"][3] > 0


class CocoDetection(Dataset):
    """(float image (3, H, W) in [0, 1], target dict) per image. ``train``: the training targets
    (crowds left out) and a horizontal flip with probability ``flip`` drawn from ``(seed, file
    name, epoch)``; otherwise the target holds only ``image_id``."""

    def __init__(self, data: CocoSet, masks: bool, train: bool, seed: int, flip: float) -> None:
        self.data, self.masks, self.train, self.seed, self.flip = data, masks, train, seed, flip
        self.images = {img["id"]: img for img in data.blob["images"]}
        self.by_image: dict[int, list[dict]] = {i: [] for i in data.image_ids}
        for ann in data.blob["annotations"]:
            if ann["image_id"] in self.by_image and _trainable(ann):
                self.by_image[ann["image_id"]].append(ann)
        self.label = {cat: i + 1 for i, cat in enumerate(data.category_ids)}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Flips are drawn from (seed, file name, epoch): call once per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data.image_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        info = self.images[self.data.image_ids[i]]
        image = read_image(self.data.images_root, info["file_name"])
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise HgkdError(f"{self.data.images_root}/{info['file_name']}: {width}x{height} pixels, the annotations "
                            f"say {info['width']}x{info['height']}")
        if not self.train:  # testing reads the image only; COCOeval matches against the JSON
            return image.float() / 255.0, {"image_id": torch.tensor(info["id"])}
        anns = self.by_image[info["id"]]
        x0, y0, w, h = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4).unbind(1)
        target = {"boxes": torch.stack([x0, y0, x0 + w, y0 + h], 1),
                  "labels": torch.tensor([self.label[a["category_id"]] for a in anns], dtype=torch.int64),
                  "image_id": torch.tensor(info["id"])}
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack([instance_mask(a["segmentation"], height, width)
                                                         for a in anns]) if anns else
                                               np.zeros((0, height, width), np.uint8))
        if view_rng(self.seed, info["file_name"], self.epoch).random() < self.flip:
            image, target = hflip(image, target, width)
        return image.float() / 255.0, target


def hflip(image: Tensor, target: dict[str, Tensor], width: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror an image and its boxes and masks left-right."""
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    flipped = {**target, "boxes": boxes}
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return image.flip(-1), flipped


def instance_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) mask of a COCO segmentation (polygons, RLE or uncompressed RLE), as
    pycocotools' ``COCO.annToMask`` decodes it."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Detection batches are lists (images differ in size; the model pads them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def batches_of(loader: DataLoader) -> Iterator[tuple[list[Tensor], list[dict]]]:
    """The loader's batches; an ``HgkdError`` raised in a worker (which the DataLoader re-raises with
    the worker's traceback as its message) comes out as its own one line again."""
    try:
        yield from loader
    except HgkdError as err:
        lines = [line for line in str(err).splitlines() if line.startswith(_RAISED)]
        raise HgkdError(lines[-1][len(_RAISED):] if lines else str(err)) from None


_RAISED = f"{HgkdError.__module__}.{HgkdError.__qualname__}: "


def read_bytes(path: str) -> bytes:
    """A whole file, local or URL (raises the filesystem's or the store's error)."""
    if is_url(path):
        fs, inner = url_fs(path)
        return fs.cat_file(inner)
    return Path(path).read_bytes()


def read_image(root: str, file_name: str) -> Tensor:
    """uint8 (3, H, W) of ``root/file_name`` (local or URL); one line when missing or undecodable."""
    path = f"{root.rstrip('/')}/{file_name}"
    try:
        data = read_bytes(path)
    except (*remote_errors(), FileNotFoundError) as err:
        raise HgkdError(f"{path}: cannot read the image ({type(err).__name__})") from None
    try:
        return decode_image(data)
    except Exception as err:  # PIL's many errors on corrupt data
        raise HgkdError(f"{path}: not a decodable image ({type(err).__name__})") from None


def load_coco(annotations: str, images: str, masks: bool = True, option: str = "--train") -> CocoSet:
    """Parse and check a COCO instances JSON and its image folder (see module docstring)."""
    blob = _read_json(annotations, option)
    where = f"{option} {annotations}"
    _check_structure(blob, where)
    image_ids = _check_images(blob["images"], where)
    category_ids = sorted(_ids(blob["categories"], "categories", where))
    sizes = {img["id"]: (img["height"], img["width"]) for img in blob["images"]}
    for ann in blob["annotations"]:
        _check_annotation(ann, sizes, set(category_ids), masks, where)
    if not blob["annotations"]:
        raise HgkdError(f"{where}: holds no annotations")
    _check_files(images, [img["file_name"] for img in blob["images"]], f"{option}-images")
    return CocoSet(annotations, images, blob, image_ids, category_ids)


def _read_json(path: str, option: str) -> dict:
    try:
        text = read_bytes(path)
    except (*remote_errors(), FileNotFoundError, IsADirectoryError) as err:
        raise HgkdError(f"{option} {path}: cannot read the annotation file ({type(err).__name__}); "
                        "give a COCO instances JSON (e.g. annotations/instances_val2017.json)") from None
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise HgkdError(f"{option} {path}: not JSON ({err}); give a COCO instances JSON") from None


def _check_structure(blob: Any, where: str) -> None:
    if not isinstance(blob, dict) or not all(isinstance(blob.get(k), list) for k in REQUIRED):
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise HgkdError(f"{where}: not COCO instances JSON (needs lists 'images', 'annotations' and 'categories'; "
                        f"found {found})")


def _ids(records: list, what: str, where: str) -> set[int]:
    ids = [r.get("id") if isinstance(r, dict) else None for r in records]
    if not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise HgkdError(f"{where}: every entry of '{what}' needs a unique integer 'id'")
    if not ids:
        raise HgkdError(f"{where}: '{what}' is empty")
    return set(ids)


def _check_images(images: list, where: str) -> list[int]:
    _ids(images, "images", where)
    for img in images:
        if not isinstance(img.get("file_name"), str) or not all(
                isinstance(img.get(k), int) and img[k] > 0 for k in ("width", "height")):
            raise HgkdError(f"{where}: image {img['id']} needs 'file_name', and 'width' and 'height' in pixels")
    return [img["id"] for img in images]


def _check_annotation(ann: Any, sizes: dict[int, tuple[int, int]], categories: set[int], masks: bool,
                      where: str) -> None:
    if not isinstance(ann, dict):
        raise HgkdError(f"{where}: an annotation is not an object: {str(ann)[:60]}")
    name = f"annotation {ann.get('id')}"
    if ann.get("image_id") not in sizes:
        raise HgkdError(f"{where}: {name} names image {ann.get('image_id')!r}, which is not in 'images'")
    if ann.get("category_id") not in categories:
        raise HgkdError(f"{where}: {name} names category {ann.get('category_id')!r}, which is not in 'categories'")
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            and box[2] >= 0 and box[3] >= 0):
        raise HgkdError(f"{where}: {name}: 'bbox' must be [x, y, width, height] (got {box!r})")
    if masks:
        _check_segmentation(ann.get("segmentation"), sizes[ann["image_id"]], f"{where}: {name}")


def _check_segmentation(segm: Any, size: tuple[int, int], where: str) -> None:
    """Polygons: lists of >= 3 (x, y) points; RLE: its 'size' is the image's [height, width]."""
    if isinstance(segm, list):
        if not segm or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                               and all(isinstance(v, (int, float)) for v in p) for p in segm):
            raise HgkdError(f"{where}: invalid polygon (each needs 3+ x, y pairs of numbers; got {str(segm)[:60]})")
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, list)):
        if list(segm.get("size", [])) != list(size):
            raise HgkdError(f"{where}: RLE size {segm.get('size')} is not the image's [height, width] {list(size)}")
    else:
        raise HgkdError(f"{where}: 'segmentation' must be polygons or RLE (got {str(segm)[:60]}); "
                        "for boxes only use --detector fasterrcnn")


def _check_files(root: str, names: list[str], option: str) -> None:
    """Every image file is in ``root`` (one recursive listing, local or URL)."""
    if is_url(root):
        fs, inner = url_fs(root)
        try:
            found = {p[len(inner.rstrip('/')) + 1:] for p in fs.find(inner)}
        except remote_errors() as err:
            raise HgkdError(f"{option} {root}: cannot list it ({type(err).__name__})") from None
    elif not os.path.isdir(root):
        raise HgkdError(f"{option} {root}: no such folder (the images of the annotation file)")
    else:
        found = {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}
    missing = [n for n in names if n not in found]
    if missing:
        raise HgkdError(f"{option} {root}: {len(missing)} of {len(names)} image files are missing "
                        f"(first: {missing[0]})")
