"""The detection fine-tuning recipe: the standard COCO "1x" schedule, every value overridable.

Defaults are detectron2's ``mask_rcnn_R_50_FPN_1x`` / mmdetection's 1x: 12 epochs (90k
iterations at 16 images), SGD momentum 0.9, lr 0.02 per 16 images scaled linearly to the batch
(Goyal et al. 2017), weight decay 1e-4 (none on norm parameters, detectron2's
``WEIGHT_DECAY_NORM=0``), a linear warm-up over 1,000 iterations from 0.001 of the lr, lr x0.1 at
epochs 8 and 11, training short side drawn from 640-800 in steps of 32 and tested at 800 (long
side at most 1,333), horizontal flips. Pure data and a pure lr function: torch-free, so the
CLI's ``--help`` and pipeline files read the defaults from here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import HgkdError

NORMS = ("syncbn", "frozen")  # hgkd.evaluate.detector: trained (Sync)BN everywhere / detectron2's frozen BN
DETECTORS = ("maskrcnn", "fasterrcnn")
REFERENCE_BATCH = 16  # the batch the lr is stated for


@dataclass(frozen=True)
class DetectionRecipe:
    """How a detector is fine-tuned and tested (see the module docstring for the sources)."""

    detector: str = "maskrcnn"  # maskrcnn: box + mask AP; fasterrcnn: box AP
    norm: str = "syncbn"  # hgkd.evaluate.detector.NORMS
    epochs: int = 12
    batch_size: int = 16  # images per step over all ranks
    lr: float = 0.02  # per REFERENCE_BATCH images
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)  # epochs after which the lr is divided by 10
    train_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)  # short side, one drawn per image
    test_size: int = 800
    max_size: int = 1333
    flip: float = 0.5
    width: int = 256  # FPN and head channels
    rois_per_image: int = 512  # sampled RoIs per training image
    proposals: tuple[int, int] = (2000, 1000)  # RPN proposals per image after NMS (train, test)
    detections_per_image: int = 100

    def __post_init__(self) -> None:
        for name in ("lr_steps", "train_sizes", "proposals"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        if self.detector not in DETECTORS:
            problems.append(f"--detector {self.detector}: choose from {', '.join(DETECTORS)}")
        if self.norm not in NORMS:
            problems.append(f"--norm {self.norm}: choose from {', '.join(NORMS)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup_iters < 0 or not 0 <= self.flip <= 1:
            problems.append("need --epochs >= 1, --batch-size >= 1, --lr > 0, --warmup-iters >= 0 and 0 <= --flip <= 1")
        if not self.train_sizes or min(self.train_sizes) < 16 or self.test_size < 16 or self.max_size < 16:
            problems.append("image sizes must be at least 16 px")
        if len(self.proposals) != 2 or min(self.proposals) < 1 or self.rois_per_image < 1 or self.width < 8:
            problems.append("--proposals needs two counts >= 1; --rois-per-image >= 1, --width >= 8")
        if problems:
            raise HgkdError("; ".join(problems))

    @classmethod
    def from_options(cls, name: str, options: dict[str, Any]) -> "DetectionRecipe":
        """Recipe ``name`` (``RECIPES``) with the given options (None: unset) replacing its values."""
        if name not in RECIPES:
            raise HgkdError(f"--recipe {name}: choose from {', '.join(RECIPES)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise HgkdError(f"detection: unknown options {unknown}")
        return replace(RECIPES[name], **{k: v for k, v in options.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def scaled_lr(self, batch_size: int) -> float:
        """The lr for ``batch_size`` images per step (linear scaling rule)."""
        return self.lr * batch_size / REFERENCE_BATCH

    def lr_at(self, iteration: int, iters_per_epoch: int, batch_size: int) -> float:
        """detectron2's WarmupMultiStepLR: linear warm-up, then x0.1 at each of ``lr_steps`` (epochs)."""
        factor = 0.1 ** sum(iteration >= step * iters_per_epoch for step in self.lr_steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return self.scaled_lr(batch_size) * factor


# The embedded digit set (``hgkd.data.digit_detection``: 256 + 64 canvases of 128 px, digits
# 24-56 px) on 2 CPU cores: native size, FPN and heads 64 wide, fewer proposals and RoIs (a
# canvas holds 2-5 digits), 4 epochs (128 steps of 8 images): 169-178 s for ResNet-18 on 2
# cores (benchmarks/results/detection.json). The lr is 4x COCO's per image: H-GKD student, box
# AP 3.9 / 14.2 / 26.9 / 33.6 / 29.2 at 0.01 / 0.04 / 0.08 / 0.16 / 0.32 (seed 0), but at 0.16
# seed 1 collapsed (14.1, and 2.9 for the scratch trunk) where 0.08 gave 21.0.
DIGITS = DetectionRecipe(epochs=4, batch_size=8, lr=0.08, warmup_iters=50, lr_steps=(3,), train_sizes=(112, 128, 144),
                         test_size=128, width=64, rois_per_image=64, proposals=(300, 100), detections_per_image=20)
RECIPES = {"1x": DetectionRecipe(), "digits": DIGITS}
AUTO = "auto"  # "digits" on the embedded set, "1x" on any other data
RECIPE_OPTIONS = frozenset(f.name for f in fields(DetectionRecipe)) | {"recipe"}
