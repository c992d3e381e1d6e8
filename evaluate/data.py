"""Labelled image sets for evaluation, held in memory as uint8 tensors.

Sources are read with ``hgkd.data.sources.open_source`` (webdataset tars whose samples carry a
``cls`` member, or an ImageFolder ``root/class/img.jpg``) and decoded with
``hgkd.data.views.decode_image``. Samples without a label (-1) or with an undecodable image
are skipped and counted.

Each image is stored once, resized (shorter side) to ``round(img_size / crop_pct)`` and
center-cropped to that square, as uint8. From that:

* the eval transform (deterministic) is the central ``img_size`` crop - up to rounding the
  pixels of the usual "resize shorter side to img_size / crop_pct, center crop img_size" - then
  ImageNet mean/std normalisation;
* the train transform (fine-tuning) is RandomResizedCrop(img_size, scale min_scale-1, ratio
  3/4-4/3; min_scale 0.08 as for ImageNet) + horizontal flip, drawn from
  ``(seed, sample key, epoch)`` with the extractor's view RNG, so a run is repeatable whatever
  the batch order or number of DataLoader workers. (The crop is taken from the stored square,
  not from the full non-square original.)

``LabelledSet.dataset()`` is a ``torch.utils.data.Dataset``: everything downstream can use a
DataLoader; the sets here are small enough to keep in memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import HgkdError
from ..pixels import normalize_unit
from ..data.sources import open_source
from ..data.views import ViewConfig, decode_image, sample_crop, view_rng

log = logging.getLogger(__name__)

CROP_PCT = 0.875  # timm/torchvision ImageNet eval: resize 256, center crop 224
MIN_SCALE = 0.08  # RandomResizedCrop's ImageNet default (Inception); small low-res sets may want 0.3-0.5
BICUBIC = InterpolationMode.BICUBIC


@dataclass
class LabelledSet:
    """Images (uint8, N x 3 x S x S, S = round(img_size / crop_pct)) with integer labels."""

    images: Tensor
    labels: Tensor  # int64 (N,)
    keys: list[str]
    img_size: int
    name: str
    classes: list[str] | None = None  # ImageFolder class names (labels index them); None for tars
    skipped_unlabelled: int = 0
    skipped_undecodable: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.unique().numel())

    def subset(self, index: Tensor | np.ndarray | list[int]) -> "LabelledSet":
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        keys = [self.keys[i] for i in idx.tolist()]
        return replace(self, images=self.images[idx], labels=self.labels[idx], keys=keys)

    def dataset(self, train: bool = False, seed: int = 0, min_scale: float = MIN_SCALE) -> "ImageDataset":
        return ImageDataset(self.images, self.labels, self.keys, self.img_size, train, seed, min_scale)


class ImageDataset(Dataset):
    """(normalised float image (3, img_size, img_size), label); ``train`` adds RRC + flip."""

    def __init__(self, images: Tensor, labels: Tensor, keys: list[str], img_size: int,
                 train: bool = False, seed: int = 0, min_scale: float = MIN_SCALE) -> None:
        if not 0.0 < min_scale <= 1.0:
            raise HgkdError(f"--min-scale {min_scale} must be in (0, 1]")
        self.images, self.labels, self.keys = images, labels, keys
        self.img_size, self.train, self.seed = img_size, train, seed
        self.crop = ViewConfig(scale=(min_scale, 1.0))  # only its scale and ratio are used
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentations are drawn from (seed, key, epoch): call once per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.images[i]
        if self.train:
            image = self._augment(image, self.keys[i])
        else:
            image = TF.center_crop(image, [self.img_size, self.img_size])
        return normalize(image), int(self.labels[i])

    def _augment(self, image: Tensor, key: str) -> Tensor:
        rng = view_rng(self.seed, key, self.epoch)
        top, left, h, w = sample_crop(rng, image.shape[-2], image.shape[-1], self.crop)
        view = TF.resized_crop(image, top, left, h, w, [self.img_size, self.img_size], interpolation=BICUBIC,
                               antialias=True)
        return view.flip(-1) if rng.random() < 0.5 else view


def normalize(image_u8: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float, ImageNet mean/std."""
    return normalize_unit(image_u8)


def eval_resize(image_u8: Tensor, size: int) -> Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased), center-crop a ``size`` square."""
    return TF.center_crop(TF.resize(image_u8, [size], interpolation=BICUBIC, antialias=True), [size, size])


def load_labelled(data: str | list[str], img_size: int = 224, crop_pct: float = CROP_PCT,
                  option: str = "--data") -> LabelledSet:
    """Read, decode and resize a labelled source (tar patterns or one image folder)."""
    specs = [data] if isinstance(data, str) else list(data)
    if not 0.0 < crop_pct <= 1.0 or img_size < 8:
        raise HgkdError(f"--img-size {img_size} / crop_pct {crop_pct}: need img_size >= 8 and 0 < crop_pct <= 1")
    if len(specs) > 1 and any(Path(s).is_dir() for s in specs):
        raise HgkdError(f"{option} {' '.join(specs)}: give one image folder, or any number of tar shards")
    try:
        source = open_source(specs)
    except HgkdError as err:
        raise HgkdError(str(err).replace("--data", option)) from None
    store = round(img_size / crop_pct)
    images, labels, keys, names = [], [], [], {}
    unlabelled = undecodable = 0
    for sample in source:
        if sample.label < 0:
            unlabelled += 1
            continue
        if source.kind == "folder":
            names[sample.label] = Path(sample.key).parts[0]
        try:
            image = decode_image(sample.data)
        except Exception:  # no image member (None), or PIL's many errors on corrupt data: skip and count
            undecodable += 1
            continue
        images.append(eval_resize(image, store))
        labels.append(sample.label)
        keys.append(sample.key)
    name = " ".join(specs)
    if unlabelled or undecodable:
        log.warning("%s: skipped %d unlabelled and %d undecodable samples", name, unlabelled, undecodable)
    if not images:
        raise HgkdError(f"{option} {name}: no labelled, decodable images ({unlabelled} without a label, "
                        f"{undecodable} undecodable); tars need a 'cls' member, folders root/class/img")
    classes = [names[i] for i in range(max(names) + 1)] if names else None
    return LabelledSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), keys, img_size, name,
                       classes, unlabelled, undecodable)


def split(source: LabelledSet, test_fraction: float = 0.25, seed: int = 0) -> tuple[LabelledSet, LabelledSet]:
    """Stratified train/test split: every class with 2+ images lands in both parts."""
    if not 0.0 < test_fraction < 1.0:
        raise HgkdError(f"--test-fraction {test_fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    labels = source.labels.numpy()
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = min(max(int(round(test_fraction * len(members))), 1), len(members) - 1)
        test_idx.extend(members[:n_test])
        train_idx.extend(members[n_test:])
    if not test_idx:
        raise HgkdError(f"{source.name}: too few images per class to split off a test set; give --test")
    return source.subset(sorted(train_idx)), source.subset(sorted(test_idx))


def align_classes(train: LabelledSet, test: LabelledSet) -> LabelledSet:
    """Re-number a folder test set's labels by class name so they match the train folder's."""
    if train.classes is None or test.classes is None or train.classes == test.classes:
        return test
    index = {name: i for i, name in enumerate(train.classes)}
    unknown = sorted(set(test.classes) - set(index))
    if unknown:
        raise HgkdError(f"--test {test.name}: classes {unknown[:5]} are not in --train {train.name}")
    mapping = torch.tensor([index[name] for name in test.classes])
    return replace(test, labels=mapping[test.labels], classes=train.classes)


def load_train_test(train: str | list[str], test: str | list[str] | None = None, img_size: int = 224,
                    test_fraction: float = 0.25, seed: int = 0,
                    crop_pct: float = CROP_PCT) -> tuple[LabelledSet, LabelledSet]:
    """The train and test sets of one evaluation: two sources, or one split by ``test_fraction``."""
    train_set = load_labelled(train, img_size, crop_pct, option="--train")
    if not test:
        return split(train_set, test_fraction, seed)
    return train_set, align_classes(train_set, load_labelled(test, img_size, crop_pct, option="--test"))
