"""Labelled image sets for evaluation, read image by image: nothing is held decoded in memory.

A :class:`LabelledSet` is a list of samples of one source - their positions, keys and integer
labels - over a ``hgkd.data.random_access.RandomAccessSource`` (webdataset tars whose samples
carry a ``cls`` member, or an ImageFolder ``root/class/img.jpg``). Its ``dataset()`` reads,
decodes (``hgkd.data.views.decode_image``) and transforms one image per item, so a DataLoader's
workers decode in parallel and memory stays bounded by the batch, whatever the set's size.
Samples without a label (-1) are left out when the set is loaded; undecodable images are
found when they are first decoded (``drop_undecodable``, or the feature cache's status) and
counted.

Each image is resized (shorter side) to ``round(img_size / crop_pct)`` and center-cropped to
that square, as uint8. From that:

* the eval transform (deterministic) is the central ``img_size`` crop - up to rounding the
  pixels of the usual "resize shorter side to img_size / crop_pct, center crop img_size" - then
  ImageNet mean/std normalisation;
* the train transform (fine-tuning) is RandomResizedCrop(img_size, scale min_scale-1, ratio
  3/4-4/3; min_scale 0.08 as for ImageNet) + horizontal flip, drawn from
  ``(seed, sample key, epoch)`` with the extractor's view RNG, so a run is repeatable whatever
  the batch order or number of DataLoader workers. (The crop is taken from the resized square,
  not from the full non-square original.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..data.random_access import RandomAccessSource
from ..data.sources import open_source
from ..data.views import ViewConfig, decode_image, sample_crop, view_rng
from ..errors import HgkdError
from ..pixels import normalize_unit

log = logging.getLogger(__name__)

CROP_PCT = 0.875  # timm/torchvision ImageNet eval: resize 256, center crop 224
MIN_SCALE = 0.08  # RandomResizedCrop's ImageNet default (Inception); small low-res sets may want 0.3-0.5
BICUBIC = InterpolationMode.BICUBIC
UNDECODABLE = -1  # the label an ImageDataset gives an image it could not decode


@dataclass
class LabelledSet:
    """Labelled samples of one source (positions ``index``, ``labels`` int64, ``keys``), read on demand."""

    source: RandomAccessSource
    index: np.ndarray  # int64 positions in the source, ascending
    labels: Tensor  # int64 (N,)
    keys: list[str]
    img_size: int
    crop_pct: float
    name: str
    classes: list[str] | None = None  # ImageFolder class names (labels index them); None for tars
    skipped_unlabelled: int = 0
    skipped_undecodable: int = 0
    checked: bool = False  # True once undecodable images are removed

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.unique().numel())

    @property
    def store_size(self) -> int:
        """Side of the resized square every transform starts from."""
        return round(self.img_size / self.crop_pct)

    def subset(self, index: Tensor | np.ndarray | list[int]) -> "LabelledSet":
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        return replace(self, index=self.index[idx], labels=self.labels[torch.from_numpy(idx)],
                       keys=[self.keys[i] for i in idx.tolist()])

    def dataset(self, train: bool = False, seed: int = 0, min_scale: float = MIN_SCALE) -> "ImageDataset":
        return ImageDataset(self, train, seed, min_scale)


class ImageDataset(Dataset):
    """(normalised float image (3, img_size, img_size), label); ``train`` adds RRC + flip.

    An image that cannot be decoded gives zeros and the label ``UNDECODABLE`` (-1)."""

    def __init__(self, data: LabelledSet, train: bool = False, seed: int = 0, min_scale: float = MIN_SCALE) -> None:
        if not 0.0 < min_scale <= 1.0:
            raise HgkdError(f"--min-scale {min_scale} must be in (0, 1]")
        self.source, self.index, self.keys = data.source, data.index, data.keys
        self.labels = data.labels.tolist()
        self.img_size, self.store_size, self.train, self.seed = data.img_size, data.store_size, train, seed
        self.crop = ViewConfig(scale=(min_scale, 1.0))  # only its scale and ratio are used
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentations are drawn from (seed, key, epoch): call once per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = read_image(self.source, int(self.index[i]))
        if image is None:
            return torch.zeros(3, self.img_size, self.img_size), UNDECODABLE
        image = eval_resize(image, self.store_size)
        if self.train:
            image = self._augment(image, self.keys[i])
        else:
            image = TF.center_crop(image, [self.img_size, self.img_size])
        return normalize(image), self.labels[i]

    def _augment(self, image: Tensor, key: str) -> Tensor:
        rng = view_rng(self.seed, key, self.epoch)
        top, left, h, w = sample_crop(rng, image.shape[-2], image.shape[-1], self.crop)
        view = TF.resized_crop(image, top, left, h, w, [self.img_size, self.img_size], interpolation=BICUBIC,
                               antialias=True)
        return view.flip(-1) if rng.random() < 0.5 else view


class _Decodable(Dataset):
    """Whether each image of a set decodes (for ``drop_undecodable``)."""

    def __init__(self, data: LabelledSet) -> None:
        self.source, self.index = data.source, data.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> bool:
        return read_image(self.source, int(self.index[i])) is not None


def read_image(source: RandomAccessSource, index: int) -> Tensor | None:
    """Sample ``index``'s image as uint8 (3, H, W), or None when it has none or it does not decode."""
    try:
        return decode_image(source.read(index))
    except Exception:  # no image member (None), or PIL's many errors on corrupt data
        return None


def normalize(image_u8: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float, ImageNet mean/std."""
    return normalize_unit(image_u8)


def eval_resize(image_u8: Tensor, size: int) -> Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased), center-crop a ``size`` square."""
    return TF.center_crop(TF.resize(image_u8, [size], interpolation=BICUBIC, antialias=True), [size, size])


def load_labelled(data: str | list[str], img_size: int = 224, crop_pct: float = CROP_PCT,
                  option: str = "--data", check: bool = True, workers: int = 0) -> LabelledSet:
    """The labelled samples of a source (tar patterns or one image folder), indexed, not decoded.

    ``check``: decode every image once (streaming, ``workers`` DataLoader workers) and leave out
    those that fail; without it they are found later (``drop_undecodable`` or the feature cache).
    """
    specs = [data] if isinstance(data, str) else list(data)
    if not 0.0 < crop_pct <= 1.0 or img_size < 8:
        raise HgkdError(f"--img-size {img_size} / crop_pct {crop_pct}: need img_size >= 8 and 0 < crop_pct <= 1")
    if len(specs) > 1 and any(Path(s).is_dir() for s in specs):
        raise HgkdError(f"{option} {' '.join(specs)}: give one image folder, or any number of tar shards")
    try:
        source = RandomAccessSource(open_source(specs))
    except HgkdError as err:
        raise HgkdError(str(err).replace("--data", option)) from None
    labels = np.asarray(source.labels, np.int64)
    index = np.flatnonzero(labels >= 0)
    name = " ".join(specs)
    if not len(index):
        raise HgkdError(f"{option} {name}: no labelled, decodable images ({len(labels)} without a label); "
                        "tars need a 'cls' member, folders root/class/img")
    classes = None
    if source.source.kind == "folder":
        names = {int(labels[i]): Path(source.keys[i]).parts[0] for i in index}
        classes = [names.get(i, "") for i in range(max(names) + 1)]
    result = LabelledSet(source, index, torch.from_numpy(labels[index]), [source.keys[i] for i in index], img_size,
                         crop_pct, name, classes, skipped_unlabelled=len(labels) - len(index))
    if result.skipped_unlabelled:
        log.warning("%s: skipped %d unlabelled samples", name, result.skipped_unlabelled)
    return drop_undecodable(result, workers, option) if check else result


def drop_undecodable(data: LabelledSet, workers: int = 0, option: str = "--data") -> LabelledSet:
    """``data`` without the images that do not decode (each image decoded once, streaming)."""
    if data.checked:
        return data
    ok = torch.cat([batch for batch in DataLoader(_Decodable(data), batch_size=64, num_workers=workers)])
    return keep_decodable(data, ok.numpy(), option)


def keep_decodable(data: LabelledSet, ok: np.ndarray, option: str = "--data") -> LabelledSet:
    """``data`` restricted to the samples where ``ok`` (bool per sample) holds; the rest counted."""
    bad = int((~ok).sum())
    if bad:
        log.warning("%s: skipped %d undecodable images", data.name, bad)
    if bad == len(ok):
        raise HgkdError(f"{option} {data.name}: no labelled, decodable images ({data.skipped_unlabelled} without a "
                        f"label, {bad} undecodable); tars need a 'cls' member, folders root/class/img")
    kept = data.subset(np.flatnonzero(ok))
    return replace(kept, skipped_undecodable=data.skipped_undecodable + bad, checked=True)


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


def labelled_few(source: LabelledSet, per_class: int, seed: int = 0) -> LabelledSet:
    """The semi-supervised protocol's labelled subset (SimCLR, BYOL: a fixed fraction of the labels):
    ``per_class`` images of every class, drawn with ``seed`` (a class with fewer keeps all)."""
    if per_class < 1:
        raise HgkdError(f"labels_per_class {per_class} must be at least 1")
    rng = np.random.default_rng([seed, per_class])
    labels = source.labels.numpy()
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return source.subset(np.sort(np.concatenate(chosen)))


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
                    test_fraction: float = 0.25, seed: int = 0, crop_pct: float = CROP_PCT,
                    workers: int = 0) -> tuple[LabelledSet, LabelledSet]:
    """The train and test sets of one evaluation (decodable images only): two sources, or one
    split by ``test_fraction``."""
    train_set = load_labelled(train, img_size, crop_pct, option="--train", workers=workers)
    if not test:
        return split(train_set, test_fraction, seed)
    return train_set, align_classes(train_set, load_labelled(test, img_size, crop_pct, option="--test",
                                                             workers=workers))
