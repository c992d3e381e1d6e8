"""Where a step's teacher targets come from: the cache (default), a live MIM teacher, or a
frozen classifier teacher (the supervised baselines).

All expose the same small interface to the trainer: a dataset of batches and its sampler,
the teacher's :class:`NetDims`, a fingerprint that a resumed run must match, queue
pre-fill, ``complete(batch)`` (fills cached-style tokens/valid/pooled),
``outputs(batch, images)`` -> the teacher's :class:`NetOutputs` for the images the student
sees, ``views`` (K views cycled over epochs, 0: a fresh view every epoch) and what the
cost ledger needs (``kind``, ``cache_rows``, ``bytes_per_view``; issue 12).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import torch

from ..data.decoders import check_decoder
from ..data.views import ViewConfig
from ..errors import HgkdError
from ..extract.teachers import create_teacher, sha256_file
from ..storage.cache import FeatureCache
from ..storage.metadata import DEFAULT_SHARD_VIEWS
from .classifier import load_classifier
from .config import DistillConfig
from .data import Batch, CacheViewDataset, ChunkAwareBatchSampler, OnlineViewDataset, TwinCacheSampler, ViewCycleSampler
from .methods import NetDims
from .outputs import NetOutputs
from .pixel_check import check_teacher_pixels


class TokenTargets:
    """Shared by the two H-GKD sources: tokens come with the batch."""

    embed_dim: int
    dataset: CacheViewDataset | OnlineViewDataset
    cache_rows: int = 0  # rows of the cache read (0: no cache)
    bytes_per_view: float = 0.0  # stored cache bytes per view (0: no cache)
    forwards: int = 0  # live teacher forwards done by this process

    @property
    def dims(self) -> NetDims:
        return NetDims(embed_dim=self.embed_dim)

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    @property
    def img_size(self) -> int:
        return self.dataset.view_cfg.img_size

    def outputs(self, batch: Batch, images_bchw: torch.Tensor) -> NetOutputs:
        return NetOutputs(tokens=batch.tokens, valid=batch.valid, pooled=batch.pooled)


class CachedTargets(TokenTargets):
    """Targets written by ``hgkd-extract run``; the teacher never runs (H-GKD stage two).

    In epoch e every image shows its cached view ``e mod K``, K = ``--cache-views`` (0: all
    the cache holds); ``--student-mask fresh`` re-draws the student's mask per epoch over a
    full-view cache (issue 12).
    """

    kind = "cache"

    def __init__(self, cfg: DistillConfig, device: torch.device, views: int | None = None) -> None:
        """``views``: K to cycle instead of ``--cache-views`` (a resumed run's K from its checkpoint)."""
        if cfg.online_views:
            raise HgkdError(f"--online-views {cfg.online_views} applies to --online-teacher; with --cache "
                            f"use --cache-views")
        self.cache = FeatureCache.open(cfg.cache)
        views = cfg.cache_views if views is None else views
        self.dataset = CacheViewDataset(cfg.cache, cfg.data, views=views, student_mask=cfg.student_mask,
                                        mask_seed=cfg.seed, decoder=None if cfg.decoder == "cache" else cfg.decoder)
        check_decoder(self.dataset.decoder, device)
        self.pixel_check = check_teacher_pixels(self.dataset, device, cfg.allow_decoder_mismatch)
        self.views = self.dataset.views
        self.embed_dim = int(self.cache.meta.teacher["embed_dim"])
        self.patch_size = int(self.cache.meta.teacher["patch_size"])
        self.fingerprint = self.cache.meta.fingerprint()
        self.cache_rows = self.cache.num_views
        self.bytes_per_view = self.cache.nbytes_stored() / max(self.cache.num_views, 1)

    def sampler(self, batch_size: int, seed: int, rank: int, world_size: int) -> ChunkAwareBatchSampler:
        return ChunkAwareBatchSampler(self.dataset.view_rows, self.cache.shard_views, batch_size, seed,
                                      rank=rank, world_size=world_size)

    def prefill_rows(self, n: int, seed: int) -> np.ndarray:
        """``n`` (at most all) random cache rows among the views this run uses (queue pre-fill)."""
        rows = self.dataset.ok_rows
        return np.sort(np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False))

    def prefill(self, rows: np.ndarray) -> torch.Tensor:
        """Pooled teacher embeddings of the given cached views."""
        return torch.from_numpy(self.dataset.reader.read(rows, ["pooled"])["pooled"].astype(np.float32))

    def complete(self, batch: Batch) -> Batch:
        return batch


class OnlineTargets(TokenTargets):
    """A frozen teacher run on every batch (``--online-teacher``): no cache needed.

    By default the paper's procedure (Sec. 4.1): in epoch e every image shows a fresh view,
    view index e drawn from (seed, key, e) - exactly view e of a cache that ``hgkd-extract
    run`` makes with the same seed and view settings. ``--online-views K`` cycles views
    ``e mod K`` instead. Batches group images as a cache with the default shard size would.
    With ``--cache`` too (the online twin of a cache, issue 22), every view setting (seed,
    crop scale and ratio, flip, interpolation, masks), the batches (that cache's shard size,
    its skipped images left out) and the queue pre-fill come from that cache: with
    ``--online-views K`` the run reads exactly the views a ``--cache-views K`` run reads, only
    the teacher runs live. Its tokens are not read.
    """

    kind = "online"

    def __init__(self, cfg: DistillConfig, device: torch.device) -> None:
        if cfg.cache_views:
            raise HgkdError(f"--cache-views {cfg.cache_views} applies to --cache; with --online-teacher use "
                            f"--online-views")
        if cfg.decoder not in ("cache", "pil"):
            raise HgkdError(f"--decoder {cfg.decoder} applies to --cache runs; an online teacher's views are "
                            f"decoded with pil")
        torch.manual_seed(cfg.seed)
        self.twin = CacheViewDataset(cfg.cache, cfg.data, views=cfg.online_views) if cfg.cache else None
        self.views = cfg.online_views
        self.row_views = cfg.online_views or cfg.epochs  # row = sample * row_views + view index
        img_size = self.twin.view_cfg.img_size if self.twin else cfg.img_size
        self.teacher = create_teacher(cfg.online_teacher, checkpoint=cfg.teacher_checkpoint,
                                      img_size=img_size).to(device)
        view = self._view_config(cfg, self.teacher.patch_size)
        if self.teacher.patch_size != view.patch_size:
            raise HgkdError(f"--online-teacher {cfg.online_teacher} has patch size {self.teacher.patch_size}; "
                            f"the views use {view.patch_size}")
        self.full_view = view.teacher_view == "full"
        self.dataset = OnlineViewDataset(cfg.data, view, student_mask=cfg.student_mask, mask_seed=cfg.seed)
        self.embed_dim, self.patch_size = self.teacher.embed_dim, self.teacher.patch_size
        ckpt = sha256_file(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else f"init-seed-{cfg.seed}"
        recipe = {**view.to_json(), "views_per_image": cfg.online_views}  # fresh views: --epochs may change
        twin = self.twin.cache.meta.fingerprint() if self.twin else None
        blob = json.dumps([cfg.online_teacher, ckpt, recipe, self.dataset.source.source.fingerprint()]
                          + ([twin] if twin else []))
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        self.amp = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None

    def _view_config(self, cfg: DistillConfig, patch_size: int) -> ViewConfig:
        """The twin cache's view settings, else the options (``view_options`` for the rest)."""
        if self.twin is None:
            extra = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.view_options.items()}
            return ViewConfig(img_size=cfg.img_size, patch_size=patch_size, mask_ratio=cfg.mask_ratio,
                              mask_granularity=cfg.mask_granularity, teacher_view=cfg.teacher_view,
                              views_per_image=self.row_views, **{"seed": cfg.seed, **extra})
        if cfg.view_options:
            raise HgkdError(f"--cache {cfg.cache}: an online twin takes its view settings from the cache; drop "
                            f"view_options {cfg.view_options}")
        if self.twin.view_cfg.decoder != "pil":
            raise HgkdError(f"--cache {cfg.cache} was decoded with {self.twin.view_cfg.decoder}; an online teacher's "
                            f"views are decoded with pil")
        return replace(self.twin.view_cfg, views_per_image=self.row_views)

    def sampler(self, batch_size: int, seed: int, rank: int, world_size: int) -> ViewCycleSampler | TwinCacheSampler:
        if self.twin is not None:
            cached = ChunkAwareBatchSampler(self.twin.view_rows, self.twin.cache.shard_views, batch_size, seed,
                                            rank=rank, world_size=world_size)
            return TwinCacheSampler(cached, self._index_of_row(), self.row_views, self.views)
        return ViewCycleSampler(self.dataset.num_samples, self.row_views, batch_size, seed, rank, world_size,
                                # grouped as a default cache's shards, so --online-views K batches equal a K-view cache's
                                samples_per_block=max(1, DEFAULT_SHARD_VIEWS // (self.views or 1)))

    def _index_of_row(self) -> np.ndarray:
        """Sample index of every twin cache row."""
        return self.twin.reader.read(np.arange(self.twin.cache.num_views), ["index"])["index"].astype(np.int64)

    def prefill_rows(self, n: int, seed: int) -> np.ndarray:
        """``n`` (at most all) random images' views: the queue starts full, as a cached run's does
        from its cache (issue 22: an empty queue handicapped the online reference). A twin takes
        the cached run's pre-fill rows (the same random cache rows, so the same views); otherwise
        epoch 0's views of random images."""
        if self.twin is not None:
            rows = self.twin.ok_rows
            pick = np.sort(np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False))
            raw = self.twin.reader.read(pick, ["index", "view_index"])
            return raw["index"].astype(np.int64) * self.row_views + raw["view_index"].astype(np.int64) % self.row_views
        pick = np.random.default_rng(seed).choice(self.dataset.num_samples, size=min(n, self.dataset.num_samples),
                                                  replace=False)
        return np.sort(pick) * self.row_views

    @torch.no_grad()
    def prefill(self, rows: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Pooled embeddings of the live teacher on those views (each a counted forward)."""
        pooled = []
        for start in range(0, len(rows), batch_size):
            batch = self.dataset[[int(r) for r in rows[start : start + batch_size]]]
            self.forwards += len(batch.images)
            pooled.append(self.teacher.targets(batch.images, ~batch.visible.flatten(1), full_view=self.full_view,
                                               amp=self.amp)[2].float().cpu())
        return torch.cat(pooled)

    def complete(self, batch: Batch) -> Batch:
        self.forwards += len(batch.images)
        tokens, valid, pooled = self.teacher.targets(batch.images, ~batch.visible.flatten(1),
                                                     full_view=self.full_view, amp=self.amp)
        return Batch(batch.rows, batch.images, batch.visible, tokens, valid, pooled, batch.labels, batch.indices)


class ClassifierTargets:
    """A frozen classifier teacher (``hgkd-distill teacher``) run on every batch.

    Views are drawn on the fly with the extractor's view code (crop + flip, no mask):
    sample s in epoch e is view ``e % K``, K = ``views_per_image`` (0: one per epoch).
    """

    kind = "classifier"
    cache_rows = 0
    bytes_per_view = 0.0
    forwards = 0

    def __init__(self, cfg: DistillConfig, device: torch.device) -> None:
        self.teacher, _ = load_classifier(cfg.teacher_classifier)
        self.teacher = self.teacher.to(device).requires_grad_(False)
        self.views = cfg.views_per_image
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

    def prefill_rows(self, n: int, seed: int) -> np.ndarray:
        return np.zeros(0, np.int64)

    def prefill(self, rows: np.ndarray) -> None:
        return None

    def complete(self, batch: Batch) -> Batch:
        return batch

    @torch.no_grad()
    def outputs(self, batch: Batch, images_bchw: torch.Tensor) -> NetOutputs:
        """Teacher outputs on exactly the (prepared, e.g. rotated) images the student sees."""
        self.forwards += len(images_bchw)
        x = self.teacher.normalise(images_bchw)
        with torch.autocast(x.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.teacher.forward_outputs(x)
        return out.detach()


def make_targets(cfg: DistillConfig, device: torch.device, supervised: bool = False,
                 views: int | None = None) -> CachedTargets | OnlineTargets | ClassifierTargets:
    """``views``: a cached run's K when resuming (the K it started with)."""
    if supervised:
        if not cfg.teacher_classifier:
            raise HgkdError(f"--method {cfg.method} needs --teacher-classifier (train one with 'hgkd-distill teacher')")
        return ClassifierTargets(cfg, device)
    return OnlineTargets(cfg, device) if cfg.online_teacher else CachedTargets(cfg, device, views)
