"""How views are drawn: :class:`ViewConfig`, torch-free so that ``--help`` can show its defaults.

The one home of the view defaults (crop scale, mask ratio and granularity, teacher view):
``hgkd-extract run`` and ``hgkd-distill run --online-teacher`` read their options' defaults
from it; ``data/views.py`` draws and renders the views it describes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import HgkdError

GRANULARITIES = (16, 32)
DECODERS = ("pil", "nvjpeg")  # hgkd.data.decoders implements them (torch-free names here, for --help)
TEACHER_VIEWS = ("masked", "full")  # full: the teacher sees the unmasked view


@dataclass(frozen=True)
class ViewConfig:
    """How views are drawn (RandomResizedCrop + flip + mask; MAE/SparK-style defaults)."""

    img_size: int = 224
    patch_size: int = 16
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    mask_ratio: float = 0.6
    mask_granularity: int = 16  # 16: teacher patches; 32: SparK-style, same holes at every CNN scale
    teacher_view: str = "masked"  # "masked" or "full" (teacher sees the unmasked view)
    seed: int = 0
    views_per_image: int = 1
    decoder: str = "pil"  # what made the pixels (hgkd.data.decoders): "pil" (CPU) or "nvjpeg" (GPU); old caches: pil

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise HgkdError(f"--mask-ratio {self.mask_ratio} must be in [0, 1)")
        if self.mask_granularity not in GRANULARITIES or self.mask_granularity % self.patch_size:
            raise HgkdError(f"--mask-granularity {self.mask_granularity} must be 16 or 32 and a multiple of the patch size")
        if self.img_size % self.mask_granularity:
            raise HgkdError(f"--img-size {self.img_size} must be a multiple of --mask-granularity {self.mask_granularity}")
        if self.teacher_view not in TEACHER_VIEWS:
            raise HgkdError(f"--teacher-view {self.teacher_view!r} must be 'masked' or 'full'")
        if self.views_per_image < 1:
            raise HgkdError("--views-per-image must be at least 1")
        if self.decoder not in DECODERS:
            raise HgkdError(f"--decoder {self.decoder!r}: choose one of {', '.join(DECODERS)}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def to_json(self) -> dict:
        """JSON of the recipe; ``decoder`` only when not ``"pil"``, the decoder of every cache made
        before it was recorded, so those caches' settings and fingerprints stay what they were."""
        blob = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if blob["decoder"] == "pil":
            del blob["decoder"]
        return blob

    @classmethod
    def from_json(cls, blob: dict) -> "ViewConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in blob.items()})
