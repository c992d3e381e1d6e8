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
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from ..config import checked_values, default_of, load_mapping
from ..data.view_config import DECODERS, ViewConfig
from ..errors import HgkdError
from ..ranges import FRACTION, IMG_SIZE_MAX, SEED, WORKERS, Range, at_least, check_ranges, option_label, positive
from ..registry import DEFAULT_METHOD

SPARSE_BACKENDS = ("auto", "minkowski", "masked", "rows")
ONLINE_VIEW_OPTIONS = ("scale", "ratio", "hflip", "interpolation", "seed")  # DistillConfig.view_options keys
STUDENT_MASKS = ("cached", "fresh")
RESUME_MODES = ("never", "auto", "always")  # --resume (issue 21): auto = continue if RUN has a checkpoint
NONFINITE_ACTIONS = ("stop", "skip")  # --nonfinite: what a step with a non-finite loss or gradient does
PAPER_EPOCHS, PAPER_WARMUP_EPOCHS = 100, 40  # Sec. 4.1: 40 warm-up epochs of 100
BATCH_MAX = 65_536  # images per step, all ranks
QUEUE_MAX = 2**20  # teacher embeddings held (4 GiB of a ViT-L's 1024-d float32)

# Allowed values of every numeric option (issue 21), checked from the command line, --config files and
# pipeline files alike, before anything is built. A maximum only where more is nonsense or unbounded memory.
TRAINING_RANGES: dict[str, Range] = {
    "epochs": at_least(1, 100_000),
    "batch_size": at_least(1, BATCH_MAX),
    "lr": positive(10.0),  # 1e12 trains to NaN weights
    "weight_decay": Range(0, 10),  # negative: weights pushed away from zero
    "seed": SEED,
    "workers": WORKERS,
    "img_size": at_least(16, IMG_SIZE_MAX),
}
RANGES: dict[str, Range] = {
    **TRAINING_RANGES,
    "clip_grad": positive(),  # max norm of clip_grad_norm_: 0 zeroes every gradient, < 0 reverses it; inf: off
    "queue_size": at_least(1, QUEUE_MAX),
    "tau": positive(10.0),  # softmax temperature of L_sim: 0 divides by zero
    "sim_weight": Range(0, 1000),
    "decoder_width": at_least(8, 8192),  # halved thrice down the UNet: 8 keeps every scale >= 1 channel
    "checkpoint_every": at_least(0),
    "log_every": at_least(0),
    "cache_views": at_least(0, 100_000),
    "online_views": at_least(0, 100_000),
    "views_per_image": at_least(0, 100_000),
    "mask_ratio": FRACTION,
    "remote_retries": at_least(0, 1000),  # None: the environment's or hgkd.remote's default
    "remote_retry_seconds": Range(0, 86_400),
}
TEACHER_RANGES: dict[str, Range] = {**TRAINING_RANGES, "num_classes": at_least(0, 1_000_000)}


def check_optimizer(name: str, label: str) -> None:
    """``name`` must be one of timm's optimizers (``lookahead_<name>`` too); one line with close matches."""
    import difflib

    from timm.optim import list_optimizers

    known = list_optimizers()
    parts = str(name).lower().split("_")
    if parts[-1] in known and (len(parts) == 1 or parts[:-1] == ["lookahead"]):
        return
    close = difflib.get_close_matches(str(name).lower(), known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. lamb, adamw, sgd, lion"
    raise HgkdError(f"{label} {name!r} is not a timm optimizer ({hint}); timm.optim.list_optimizers() "
                    f"names all {len(known)}")


def check_crop_scale(crop_scale: tuple[float, float], label: str) -> None:
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise HgkdError(f"{label} {list(crop_scale)} must be two area fractions 0 < low <= high <= 1")

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
    nonfinite: str = "stop"  # a non-finite loss term or grad norm: "stop" the run (one line) or "skip" the step
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
    # remote reads (issue 21): retries of transient faults and their total time; None = $HGKD_REMOTE_RETRIES /
    # $HGKD_REMOTE_RETRY_SECONDS, else hgkd.remote.RetryPolicy's defaults (8 retries, 120 s)
    remote_retries: int | None = None
    remote_retry_seconds: float | None = None

    def __post_init__(self) -> None:
        from .methods import METHODS

        self.check_values(option_label)  # from_dict checked them first, naming the file
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
        if (self.remote_retries is not None and self.remote_retries < 0) or (
                self.remote_retry_seconds is not None and self.remote_retry_seconds < 0):
            raise HgkdError(f"--remote-retries {self.remote_retries} / --remote-retry-seconds "
                            f"{self.remote_retry_seconds}: must be >= 0 (0: no retries)")
        if self.nonfinite not in NONFINITE_ACTIONS:
            raise HgkdError(f"--nonfinite {self.nonfinite!r}: choose one of {', '.join(NONFINITE_ACTIONS)}")
        if self.cache_views < 0 or self.online_views < 0:
            raise HgkdError("--cache-views and --online-views must be >= 0 (0: all cached views / fresh views)")

    def check_values(self, label: Callable[[str], str]) -> None:
        """Numeric ranges, crop scale and optimizer name (issue 21); ``label(key)`` names the value."""
        check_ranges({key: getattr(self, key) for key in RANGES if hasattr(self, key)}, RANGES, label)
        check_crop_scale(tuple(self.crop_scale), label("crop_scale"))
        check_optimizer(self.optimizer, label("optimizer"))

    @property
    def encoder_backend(self) -> str:
        return self.sparse_backend if self.sparse else "dense"

    def to_dict(self) -> dict[str, Any]:
        blob = asdict(self)
        blob["crop_scale"] = list(self.crop_scale)  # YAML-safe
        return blob

    @classmethod
    def from_dict(cls, blob: dict[str, Any], source: str = "config", options: Iterable[str] = ()) -> "DistillConfig":
        """Checked config from a mapping; ``source`` names the file (``"options"``: the command line),
        ``options`` the keys given on the command line (named ``--key`` in errors)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(blob) - known)
        if unknown:
            raise HgkdError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        values = checked_values(cls, blob, source)
        given = set(options)
        label = partial(_label, source, given)
        check_ranges(values, RANGES, label)  # before anything is built from them (issue 21)
        if "crop_scale" in values:  # a list of 2 numbers (checked_values)
            check_crop_scale(tuple(values["crop_scale"]), label("crop_scale"))
        if "optimizer" in values:
            check_optimizer(values["optimizer"], label("optimizer"))
        return cls(**values)

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

    def __post_init__(self) -> None:
        """Ranges, warm-up, crop scale and optimizer before any data is read (issue 21)."""
        check_ranges({key: getattr(self, key) for key in TEACHER_RANGES}, TEACHER_RANGES, option_label)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise HgkdError(f"--warmup-epochs {self.warmup_epochs} must be between 0 and --epochs {self.epochs}")
        check_crop_scale(tuple(self.crop_scale), "--crop-scale")
        check_optimizer(self.optimizer, "--optimizer")


def _label(source: str, options: set[str], key: str) -> str:
    """``--lr`` for a command-line value, ``recipe.yaml: lr:`` for one from a file."""
    return option_label(key) if source == "options" or key in options else f"{source}: {key}:"


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
