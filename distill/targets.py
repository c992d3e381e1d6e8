"""Where a step's teacher targets come from: the cache (default) or a live teacher.

Both expose the same small interface to the trainer: a dataset of batches, the target
width and patch size, a fingerprint that a resumed run must match, queue pre-fill, and
``complete(batch)`` which fills tokens/valid/pooled.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from ..extract.run import teacher_targets
from ..extract.teachers import create_teacher, sha256_file
from ..extract.views import ViewConfig
from ..storage.cache import FeatureCache
from .config import DistillConfig
from .data import Batch, CacheViewDataset, OnlineViewDataset


class CachedTargets:
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


class OnlineTargets:
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
        return Batch(batch.rows, batch.images, batch.visible, tokens, valid, pooled)


def make_targets(cfg: DistillConfig, device: torch.device) -> CachedTargets | OnlineTargets:
    return OnlineTargets(cfg, device) if cfg.online_teacher else CachedTargets(cfg, device)
