"""Allowed values of ``hgkd-evaluate``'s numeric options (issue 21), by option name: the CLI's
click types (``ranged``) and a pipeline's ``eval`` section (``task_ranges``) read them here."""
from __future__ import annotations

from ..ranges import IMG_SIZE_MAX, SEED, WORKERS, Range, Ranged, at_least, positive

FRACTION_OPEN = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
AREA = Range(0, 1, low_open=True)  # (0, 1]

# kNN, probes and fine-tuning (one meaning per name across them)
IMAGE_RANGES: dict[str, Range] = {
    "test_fraction": FRACTION_OPEN,
    "img_size": at_least(8, IMG_SIZE_MAX),
    "crop_pct": AREA,
    "batch_size": at_least(2, 65_536),  # BatchNorm needs two images
    "workers": WORKERS,
    "memory_mb": positive(),
    "seed": SEED,
    "k": at_least(1, 100_000),
    "temperature": positive(100.0),
    "epochs": at_least(1, 100_000),
    "lr": positive(10.0),
    "weight_decay": Range(0, 10),
    "hidden": at_least(1, 65_536),
    "probe_batch_size": at_least(2, 1 << 20),
    "min_scale": AREA,
    "labels_per_class": at_least(1),
}
DETECTION_RANGES: dict[str, Range] = {
    "epochs": at_least(1, 100_000),
    "batch_size": at_least(1, 65_536),
    "lr": positive(10.0),
    "momentum": Range(0, 1, high_open=True),
    "weight_decay": Range(0, 10),
    "warmup_iters": at_least(0),
    "test_size": at_least(16, 8192),
    "max_size": at_least(16, 8192),
    "flip": Range(0, 1),
    "width": at_least(8, 4096),
    "rois_per_image": at_least(1, 100_000),
    "detections_per_image": at_least(1, 100_000),
    "workers": WORKERS,
    "checkpoint_every": at_least(0),
    "seed": SEED,
}


def task_ranges(task: str) -> dict[str, Range]:
    """The ranges of a registered task's options."""
    return DETECTION_RANGES if task == "detection" else IMAGE_RANGES


def ranged(name: str, detection: bool = False) -> Ranged:
    """The click type of option ``name`` (``--k``, ...)."""
    return Ranged((DETECTION_RANGES if detection else IMAGE_RANGES)[name])
