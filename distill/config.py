"""Configuration of a distillation run: the paper's recipe as defaults (H-GKD Sec. 4.1), and
of the classifier teacher the supervised baselines distil from.

Loaded from an optional YAML file, then overridden by explicitly given CLI options; the
resolved config is written to the run directory and into every checkpoint. Torch-free: the
CLI options read their defaults from these dataclasses (``hgkd.config.default_of``); the view
defaults come from :class:`~hgkd.data.view_config.ViewConfig`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import checked_values, default_of, load_mapping
from ..data.view_config import DECODERS, ViewConfig
from ..errors import HgkdError
from ..registry import DEFAULT_METHOD

SPARSE_BACKENDS = ("auto", "minkowski", "masked", "rows")
ONLINE_VIEW_OPTIONS = ("scale", "ratio", "hflip", "interpolation", "seed")  # DistillConfig.view_options keys
STUDENT_MASKS = ("cached", "fresh")
PAPER_EPOCHS, PAPER_WARMUP_EPOCHS = 100, 40  # Sec. 4.1: 40 warm-up epochs of 100

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    cache: str = ""
    data: list[str] = field(default_factory=list)
    out: str = ""
    method: str = DEFAULT_METHOD  # any registered method (hgkd.distill.methods.METHODS)
    method_opts: dict[str, Any] = field(default_factory=dict)  # the method's own hyper-parameters
    optimizer: str = "lamb"  # any timm optimizer name
    student: str = "resnet50"
    # how sparse convs run: "auto" = the measured-fastest that runs on the device (issue 20; resolved by the
    # trainer and saved resolved), "minkowski" = MinkowskiEngine, "masked" = SparK-style emulation, "rows" = active rows
    sparse_backend: str = "auto"
    sparse: bool = True  # ablation: False = ordinary convs on the zero-filled image
    unet: bool = True  # ablation: False = same-depth plain head on the deepest scale
    similarity: bool = True  # ablation: False = L_mse only
    decoder_width: int = 512
    epochs: int = 100
    warmup_epochs: int | None = None  # None: the paper's 40, or 40/100 of epochs when epochs < 40
    batch_size: int = 1024  # global; split evenly over DDP ranks
    lr: float = 8e-4
    weight_decay: float = 1e-4
    clip_grad: float = 5.0
    queue_size: int = 50_000
    tau: float = 0.009
    sim_weight: float = 1.0  # lambda in L = L_mse + lambda * L_sim
    prefill_queue: bool = True
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    # what renders the cached views (issue 20): "cache" = the decoder that made the teacher's pixels (recorded in the
    # cache), or pil / nvjpeg; a pixel difference from the cache's fingerprint stops the run unless allowed
    decoder: str = "cache"
    allow_decoder_mismatch: bool = False
    amp: bool = True  # bf16 autocast on CUDA; CPU runs fp32
    checkpoint_every: int = 0  # steps; 0 = at epoch ends only
    log_every: int = 10
    # views budget (issue 12): an epoch is one pass over the images; image i shows view e mod K in epoch e
    cache_views: int = 0  # K: use views 0..K-1 of the cache; 0 = every view it holds
    student_mask: str = "cached"  # "fresh": a new student mask every epoch (full-view teacher targets only)
    # --online-teacher: run this registered teacher on every batch instead of reading a cache
    online_teacher: str | None = None
    teacher_checkpoint: str | None = None
    img_size: int = default_of(ViewConfig, "img_size")
    mask_ratio: float = default_of(ViewConfig, "mask_ratio")
    mask_granularity: int = default_of(ViewConfig, "mask_granularity")
    teacher_view: str = default_of(ViewConfig, "teacher_view")  # "full": the online teacher sees the unmasked view
    online_views: int = 0  # views cycled over epochs (view e mod K); 0 = a fresh view every epoch (the paper)
    # the online teacher's other view settings (ViewConfig: scale, ratio, hflip, interpolation, seed; seed defaults
    # to --seed): a pipeline's online twin of a cache takes every one of that cache's (issue 22)
    view_options: dict[str, Any] = field(default_factory=dict)
    # supervised baselines: a frozen classifier teacher written by 'hgkd-distill teacher'
    teacher_classifier: str | None = None
    views_per_image: int = 0  # views cycled over epochs; 0 = a fresh view every epoch
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale of those views

    def __post_init__(self) -> None:
        from .methods import METHODS

        if self.method not in METHODS:
            raise HgkdError(f"--method {self.method!r}: choose one of {', '.join(METHODS.names())}")
        if not isinstance(self.method_opts, dict):
            raise HgkdError(f"method_opts must be a mapping of option names to values, got {self.method_opts!r}")
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        bad = sorted(set(self.view_options) - set(ONLINE_VIEW_OPTIONS)) if isinstance(self.view_options, dict) else None
        if bad is None or bad:
            raise HgkdError(f"view_options {self.view_options!r}: a mapping of {', '.join(ONLINE_VIEW_OPTIONS)}"
                            + (f" (not {', '.join(bad)})" if bad else ""))
        if self.decoder not in ("cache", *DECODERS):
            raise HgkdError(f"--decoder {self.decoder!r}: choose one of cache, {', '.join(DECODERS)}")
        if self.sparse_backend not in SPARSE_BACKENDS:
            raise HgkdError(f"--sparse-backend {self.sparse_backend!r}: choose one of {', '.join(SPARSE_BACKENDS)}")
        if self.warmup_epochs is None:
            self.warmup_epochs = default_warmup_epochs(self.epochs)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise HgkdError(f"--warmup-epochs {self.warmup_epochs} must be between 0 and --epochs {self.epochs}")
        if self.batch_size < 1 or self.epochs < 1:
            raise HgkdError("--batch-size and --epochs must be positive")
        if self.student_mask not in STUDENT_MASKS:
            raise HgkdError(f"--student-mask {self.student_mask!r}: choose one of {', '.join(STUDENT_MASKS)}")
        if self.cache_views < 0 or self.online_views < 0:
            raise HgkdError("--cache-views and --online-views must be >= 0 (0: all cached views / fresh views)")

    @property
    def encoder_backend(self) -> str:
        return self.sparse_backend if self.sparse else "dense"

    def to_dict(self) -> dict[str, Any]:
        blob = asdict(self)
        blob["crop_scale"] = list(self.crop_scale)  # YAML-safe
        return blob

    @classmethod
    def from_dict(cls, blob: dict[str, Any], source: str = "config") -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(blob) - known)
        if unknown:
            raise HgkdError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**checked_values(cls, blob, source))

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class TeacherConfig:
    """Options of ``hgkd-distill teacher``."""

    data: list[str]
    out: str
    arch: str
    init_checkpoint: str | None = None
    num_classes: int = 0  # 0: largest label + 1
    img_size: int = default_of(ViewConfig, "img_size")
    branches: bool = False  # auxiliary branches, for methods whose teacher_needs hold branch_logits (HSAKD)
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    seed: int = 0
    workers: int = 1
    device: str = "auto"
    test_data: list[str] = field(default_factory=list)  # held-out labelled data for the reported accuracy


def default_warmup_epochs(epochs: int) -> int:
    """The paper's 40 warm-up epochs, scaled to its proportion (40/100) when ``epochs`` < 40."""
    if epochs >= PAPER_WARMUP_EPOCHS:
        return PAPER_WARMUP_EPOCHS
    scaled = max(epochs, 0) * PAPER_WARMUP_EPOCHS // PAPER_EPOCHS
    log.warning("--warmup-epochs not given: the default %d exceeds --epochs %d, using %d (the paper's %d/%d)",
                PAPER_WARMUP_EPOCHS, epochs, scaled, PAPER_WARMUP_EPOCHS, PAPER_EPOCHS)
    return scaled


def load_yaml(path: str) -> dict[str, Any]:
    """``--config`` file: option names with dashes or underscores."""
    return {k.replace("-", "_"): v for k, v in load_mapping(path, f"--config {path}").items()}
