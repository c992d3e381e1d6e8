"""Frozen features, computed once per (student weights, data, view recipe) into a feature cache.

``frozen_features`` streams the labelled images of a source through the backbone (DataLoader
workers decode, the eval transform of ``hgkd.evaluate.data``) into a ``storage.features``
``FeatureStore`` under ``features_dir``, named by the hash of what decides the features: the
model's weights, the data's fingerprint (files and sizes) and the view recipe. A second probe
of the same model and data reads it back; an interrupted extraction resumes at the first
unwritten shard, and shards whose files were lost or whose status is damaged are recomputed
(issue 21). ``FeatureRows`` is a selection of a store's rows (a train or test split), read
in contiguous blocks, so a probe never needs all features in memory at once.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..storage.features import STATUS_OK, STATUS_UNDECODABLE, FeatureStore
from .data import UNDECODABLE, LabelledSet

log = logging.getLogger(__name__)

SHARD_BYTES = 4 * 2**20  # features per shard file (and per write)
RECIPE = {"version": 1, "transform": "resize shorter side to round(img_size / crop_pct) (bicubic, antialiased), "
          "center crop img_size, ImageNet mean/std", "features": "forward_head(forward_features(x), pre_logits=True)"}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pooled_features(model: nn.Module, x_bchw: Tensor) -> Tensor:
    """Global-average-pooled penultimate features (B, D) of a timm model."""
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x_bchw), pre_logits=True)
    return model(x_bchw)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and every parameter and buffer (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class FeatureRows:
    """Rows ``rows`` (ascending) of a complete store, in that order; read ``block_rows`` at a time."""

    store: FeatureStore
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return self.store.dim

    def part(self, lo: int, hi: int) -> Tensor:
        """Features of positions ``lo .. hi - 1`` (one contiguous read of the store)."""
        rows = self.rows[lo:hi]
        return torch.from_numpy(self.store.take(rows))

    def load(self) -> Tensor:
        return torch.cat([block for _, block in self.blocks(65536)]) if len(self) else torch.zeros(0, self.dim)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        for lo in range(0, len(self), block_rows):
            yield lo, self.part(lo, lo + block_rows)


Features = Tensor | FeatureRows


def feature_blocks(features: Features, block_rows: int) -> Iterator[tuple[int, Tensor]]:
    """(first position, features (B, D) float32) blocks in order, from memory or from the store."""
    if isinstance(features, Tensor):
        for lo in range(0, len(features), block_rows):
            yield lo, features[lo:lo + block_rows].float()
    else:
        yield from features.blocks(block_rows)


def in_memory(features: Features, memory_mb: float) -> Features:
    """``features`` loaded as one tensor when N x D float32 fits ``memory_mb``, else left in the store."""
    if isinstance(features, FeatureRows) and len(features) * features.dim * 4 <= memory_mb * 2**20:
        return features.load()
    return features


def whole_source(data: LabelledSet) -> LabelledSet:
    """Every labelled sample of ``data``'s source (a feature cache covers them all, in source order)."""
    labels = np.asarray(data.source.labels, np.int64)
    index = np.flatnonzero(labels >= 0)
    return LabelledSet(data.source, index, torch.from_numpy(labels[index]), [data.source.keys[i] for i in index],
                       data.img_size, data.crop_pct, data.name)


def frozen_features(model: nn.Module, data: LabelledSet, features_dir: str | Path, batch_size: int = 64,
                    workers: int = 0, shard_rows: int | None = None) -> FeatureStore:
    """The complete feature cache of ``model`` on ``data``'s source: read back, resumed or computed.

    ``shard_rows``: rows per shard file (default: about 4 MiB of features, a multiple of 256)."""
    whole = whole_source(data)
    meta = {"model": model_fingerprint(model), "data": data.source.source.fingerprint(),
            "recipe": {**RECIPE, "img_size": data.img_size, "crop_pct": data.crop_pct}}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    url = str(Path(features_dir) / f"{key}.zarr")
    Path(features_dir).mkdir(parents=True, exist_ok=True)
    dim = feature_dim(model, data.img_size)
    shard_rows = shard_rows or max(256, SHARD_BYTES // (4 * dim) // 256 * 256)
    store = FeatureStore.create_or_resume(url, meta, whole.index, dim, shard_rows=shard_rows,
                                          chunk_rows=min(256, shard_rows))
    lost = store.lost_shards()
    if lost:  # a chunk file deleted or a status chunk damaged: it is a cache, so those rows are recomputed
        log.warning("%s: feature cache shards %s were lost or damaged; recomputing them", url, lost[:10])
        store.forget(lost)
    pending = store.pending_shards()
    if pending:
        log.info("%s: extracting features of %d images (%d shards) -> %s", data.name, len(whole),
                 len(pending), url)
        _extract(model, whole, store, pending, batch_size, workers)
    if not store.is_complete:
        store.finalize()
    return store


def feature_dim(model: nn.Module, img_size: int) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dim = pooled_features(model, torch.zeros(2, 3, img_size, img_size, device=model_device(model))).shape[1]
    model.train(was_training)
    return int(dim)


def _extract(model: nn.Module, whole: LabelledSet, store: FeatureStore, pending: list[int], batch_size: int,
             workers: int) -> None:
    """Stream the pending shards' images through ``model``; write each shard as soon as it is full."""
    rows = np.concatenate([np.arange(r.start, r.stop) for r in map(store.rows_of_shard, pending)])
    loader = DataLoader(Subset(whole.dataset(), rows.tolist()), batch_size=batch_size, num_workers=workers)
    device, was_training = model_device(model), model.training
    model.eval()
    shards = iter(pending)
    shard = next(shards)
    feats: list[np.ndarray] = []
    status: list[np.ndarray] = []
    with torch.no_grad():
        for x_bchw, y in loader:
            feats.append(pooled_features(model, x_bchw.to(device)).float().cpu().numpy())
            status.append(np.where(y.numpy() == UNDECODABLE, STATUS_UNDECODABLE, STATUS_OK).astype(np.uint8))
            feats[-1][status[-1] != STATUS_OK] = 0.0
            while shard is not None and sum(map(len, status)) >= len(store.rows_of_shard(shard)):
                need = len(store.rows_of_shard(shard))
                f, s = np.concatenate(feats), np.concatenate(status)
                store.write_shard(shard, f[:need], s[:need])
                log.info("features: shard %d of %d written", shard + 1, store.num_shards)
                feats, status = [f[need:]], [s[need:]]
                shard = next(shards, None)
    model.train(was_training)


def rows_of(store: FeatureStore, data: LabelledSet) -> np.ndarray:
    """Store rows of ``data``'s samples (every sample must be one of the store's)."""
    index = store.index()
    rows = np.searchsorted(index, data.index)
    if len(rows) and (rows.max() >= len(index) or not np.array_equal(index[rows], data.index)):
        raise ValueError("the feature cache does not cover this set's samples")
    return rows


def decodable(store: FeatureStore, data: LabelledSet) -> np.ndarray:
    """Per sample of ``data``: whether its image decoded when the features were computed."""
    return store.status()[rows_of(store, data)] == STATUS_OK
