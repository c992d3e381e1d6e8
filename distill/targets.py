"""Where a step's teacher targets come from: the cache (default), a live MIM teacher, or a
frozen classifier teacher (the supervised baselines).

All expose the same small interface to the trainer: a dataset of batches and its sampler,
the teacher's :class:`NetDims`, a fingerprint that a resumed run must match, queue
pre-fill, ``complete(batch)`` (fills cached-style tokens/valid/pooled) and
``outputs(batch, images)`` -> the teacher's :class:`NetOutputs` for the images the student sees.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from ..errors import HgkdError

from ..extract.run import teacher_targets
from ..extract.teachers import create_teacher, sha256_file
from ..extract.views import ViewConfig
from ..storage.cache import FeatureCache
from .classifier import load_classifier
from .config import DistillConfig
from .data import Batch, CacheViewDataset, ChunkAwareBatchSampler, OnlineViewDataset, ViewCycleSampler
from .methods import NetDims
from .outputs import NetOutputs


class TokenTargets:
    """Shared by the two H-GKD sources: tokens come with the batch."""

    embed_dim: int
    shard_views: int
    dataset: CacheViewDataset | OnlineViewDataset

    @property
    def dims(self) -> NetDims:
        return NetDims(embed_dim=self.embed_dim)

    @property
    def num_samples(self) -> int:
        return len(self.dataset.ok_rows)

    @property
    def img_size(self) -> int:
        return self.dataset.view_cfg.img_size

    def sampler(self, batch_size: int, seed: int, rank: int, world_size: int) -> ChunkAwareBatchSampler:
        return ChunkAwareBatchSampler(self.dataset.ok_rows, self.shard_views, batch_size, seed,
                                      rank=rank, world_size=world_size)

    def outputs(self, batch: Batch, images_bchw: torch.Tensor) -> NetOutputs:
        return NetOutputs(tokens=batch.tokens, valid=batch.valid, pooled=batch.pooled)


class CachedTargets(TokenTargets):
    """Targets written by ``hgkd-extract run``; the teacher never runs (H-GKD stage two)."""

    def __init__(self, cfg: DistillConfig, device: torch.device) -> None:
        self.cache = FeatureCache.open(cfg.cache)
        self.dataset = CacheViewDataset(cfg.cache, cfg.data)
        self.embed_dim = int(self.cache.meta.teacher["embed_dim"])
        self.patch_size = int(self.cache.meta.teacher["patch_size"])
        self.shard_views = self.cache.shard_views
        self.fingerprint = self.cache.meta.fingerprint()

    def prefill(self, n: int, seed: int) -> torch.Tensor:
        """Pooled teacher embeddings of ``n`` random cached views (queue pre-fill)."""
        rows = np.sort(np.random.default_rng(seed).choice(self.dataset.ok_rows, size=n, replace=False))
        return torch.from_numpy(self.dataset.reader.read(rows, ["pooled"])["pooled"].astype(np.float32))

    def complete(self, batch: Batch) -> Batch:
        return batch


class OnlineTargets(TokenTargets):
    """A frozen teacher run on every batch (``--online-teacher``): no cache needed."""

    def __init__(self, cfg: DistillConfig, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        self.teacher = create_teacher(cfg.online_teacher, checkpoint=cfg.teacher_checkpoint,
                                      img_size=cfg.img_size).to(device)
        view = ViewConfig(img_size=cfg.img_size, patch_size=self.teacher.patch_size, mask_ratio=cfg.mask_ratio,
                          mask_granularity=cfg.mask_granularity, seed=cfg.seed)
        self.dataset = OnlineViewDataset(cfg.data, view)
        self.embed_dim, self.patch_size = self.teacher.embed_dim, self.teacher.patch_size
        self.shard_views = 256  # no cache shards: any locality window is fine
        ckpt = sha256_file(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else f"init-seed-{cfg.seed}"
        blob = json.dumps([cfg.online_teacher, ckpt, view.to_json(), self.dataset.source.source.fingerprint()])
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        self.amp = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None

    def prefill(self, n: int, seed: int) -> None:
        return None  # the queue fills during the first steps

    def complete(self, batch: Batch) -> Batch:
        tokens, valid, pooled = teacher_targets(self.teacher, batch.images, ~batch.visible.flatten(1), amp=self.amp)
        return Batch(batch.rows, batch.images, batch.visible, tokens, valid, pooled, batch.labels, batch.indices)


class ClassifierTargets:
    """A frozen classifier teacher (``hgkd-distill teacher``) run on every batch.

    Views are drawn on the fly with the extractor's view code (crop + flip, no mask):
    sample s in epoch e is view ``e % K``, K = ``views_per_image`` (0: one per epoch).
    """

    def __init__(self, cfg: DistillConfig, device: torch.device) -> None:
        self.teacher, _ = load_classifier(cfg.teacher_classifier)
        self.teacher = self.teacher.to(device).requires_grad_(False)
        self.views_per_image = cfg.views_per_image or cfg.epochs
        view = ViewConfig(img_size=self.teacher.img_size, mask_ratio=0.0, seed=cfg.seed,
                          views_per_image=self.views_per_image, scale=tuple(cfg.crop_scale))
        self.dataset = OnlineViewDataset(cfg.data, view, labelled=True)
        if self.dataset.num_classes > self.teacher.num_classes:
            raise HgkdError(f"--data has labels up to {self.dataset.num_classes - 1} but --teacher-classifier "
                            f"{cfg.teacher_classifier} predicts {self.teacher.num_classes} classes")
        self.dims = self.teacher.dims
        self.num_samples = self.dataset.num_samples
        self.img_size = self.teacher.img_size
        blob = json.dumps([sha256_file(cfg.teacher_classifier), view.to_json(), self.dataset.source.source.fingerprint()])
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        self.amp = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None

    def sampler(self, batch_size: int, seed: int, rank: int, world_size: int) -> ViewCycleSampler:
        return ViewCycleSampler(self.num_samples, self.views_per_image, batch_size, seed, rank, world_size)

    def prefill(self, n: int, seed: int) -> None:
        return None

    def complete(self, batch: Batch) -> Batch:
        return batch

    @torch.no_grad()
    def outputs(self, batch: Batch, images_bchw: torch.Tensor) -> NetOutputs:
        """Teacher outputs on exactly the (prepared, e.g. rotated) images the student sees."""
        x = self.teacher.normalise(images_bchw)
        with torch.autocast(x.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.teacher.forward_outputs(x)
        return out.detach()


def make_targets(cfg: DistillConfig, device: torch.device,
                 supervised: bool = False) -> CachedTargets | OnlineTargets | ClassifierTargets:
    if supervised:
        if not cfg.teacher_classifier:
            raise HgkdError(f"--method {cfg.method} needs --teacher-classifier (train one with 'hgkd-distill teacher')")
        return ClassifierTargets(cfg, device)
    return OnlineTargets(cfg, device) if cfg.online_teacher else CachedTargets(cfg, device)
