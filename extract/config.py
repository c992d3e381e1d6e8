"""Options of ``hgkd-extract run``: :class:`ExtractConfig`, torch-free so that ``--help`` reads
its defaults (with those of :class:`ViewConfig` and :class:`CodecSpec`) from here."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.view_config import ViewConfig
from ..errors import HgkdError
from ..storage.codecs import CodecSpec
from ..storage.metadata import DEFAULT_SHARD_VIEWS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
        """Sizes are checked before anything is loaded or written (issue 11)."""
        for option, value in (("--shard-views", self.shard_views), ("--batch-size", self.batch_size),
                              ("--img-size", self.view.img_size), ("--world-size", self.world_size)):
            if value < 1:
                raise HgkdError(f"{option} {value} must be at least 1")
        if self.workers < 0:
            raise HgkdError(f"--workers {self.workers} must be 0 or more")
