"""Options of ``hgkd-extract run``: :class:`ExtractConfig`, torch-free so that ``--help`` reads
its defaults (with those of :class:`ViewConfig` and :class:`CodecSpec`) from here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..data.view_config import ViewConfig
from ..errors import HgkdError
from ..ranges import IMG_SIZE_MAX, SEED, WORKERS, Range, at_least, check_ranges, option_label
from ..storage.codecs import CodecSpec
from ..storage.metadata import DEFAULT_SHARD_VIEWS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Allowed values of the numeric options (issue 21), checked before the teacher is loaded or the cache made.
# A shard is held in memory while it is written: 16384 views of a ViT-L at float16 are 6.6 GB.
RANGES: dict[str, Range] = {
    "shard_views": at_least(1, 16_384),
    "batch_size": at_least(1, 65_536),
    "workers": WORKERS,
    "rank": at_least(0),  # and below --world-size (checked by the run)
    "world_size": at_least(1, 65_536),
    "init_seed": SEED,
}
VIEW_RANGES: dict[str, Range] = {
    "img_size": at_least(1, IMG_SIZE_MAX),  # and a multiple of --mask-granularity (ViewConfig)
    "views_per_image": at_least(1, 100_000),
    "seed": SEED,
}
CLEVELS: dict[str, Range] = {"lz4": at_least(0, 9), "zstd": at_least(1, 22)}  # blosc's and zstd's levels


@dataclass
class ExtractConfig:
    """Options of ``hgkd-extract run``."""

    data: list[str]
    out: str
    teacher: str
    checkpoint: str | None = None
    view: ViewConfig = field(default_factory=ViewConfig)
    codec: CodecSpec = field(default_factory=CodecSpec)
    shard_views: int = DEFAULT_SHARD_VIEWS
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA, fp32 on CPU)
    workers: int = 2  # loader processes reading and decoding images and rendering views (0: in this process)
    rank: int = 0
    world_size: int = 1
    init_seed: int = 0  # weights of a teacher without --checkpoint (demo/tests only)
    progress: bool = True

    def __post_init__(self) -> None:
        """Sizes are checked before anything is loaded or written (issues 11, 21)."""
        self.check_values(option_label)

    def check_values(self, label: Callable[[str], str]) -> None:
        """Every numeric option against its range; ``label(key)`` names it (``--shard-views``, or a file's key)."""
        check_ranges({key: getattr(self, key) for key in RANGES}, RANGES, label)
        check_ranges({key: getattr(self.view, key) for key in VIEW_RANGES}, VIEW_RANGES, label)
        levels = CLEVELS.get(self.codec.compressor)
        problem = levels.problem(self.codec.clevel) if levels else None
        if problem:
            raise HgkdError(f"{label('clevel')} {self.codec.clevel} {problem} for {self.codec.compressor}")
