"""The evaluation's feature cache after damage (issue 21, "Also broken"): a chunk file deleted
(zarr would read it as zeros: kNN once printed 10% instead of 51% with exit 0) or a status chunk
deleted or damaged (once reported as undecodable test images) is found and recomputed, so the
result equals the clean cache's; a status array that cannot be read names the cache."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from hgkd.errors import HgkdError
from hgkd.evaluate import load_labelled, run_task
from hgkd.evaluate.features import frozen_features
from hgkd.storage.features import FeatureStore

streaming = importlib.import_module("test_evaluate_streaming")
tars, model, one_thread = streaming.tars, streaming.model, streaming.one_thread  # fixtures


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "features shard deleted": lambda url: (url / "features" / "c" / "1" / "0").unlink(),
    "status chunk deleted": lambda url: (url / "status" / "c" / "2").unlink(),
    "status chunk flipped": lambda url: _flip(url / "status" / "c" / "0", 3),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_lost_or_damaged_chunk_is_recomputed_and_knn_is_unchanged(tars, model, tmp_path, damage):
    data = load_labelled(tars, img_size=32, check=False)
    store = frozen_features(model, data, tmp_path, shard_rows=16)  # 5 shards of 16 rows
    clean = run_task("knn", model, data, features_dir=tmp_path, img_size=32, k=5)
    DAMAGE[damage](Path(store.url))
    assert FeatureStore.open(store.url).lost_shards()
    got = run_task("knn", model, data, features_dir=tmp_path, img_size=32, k=5)
    for key in ("top1", "top5", "n_train", "n_test", "skipped_undecodable"):
        assert got[key] == clean[key], key
    assert FeatureStore.open(store.url).lost_shards() == []  # repaired in place


def test_unreadable_status_names_the_cache_not_the_images(tars, model, tmp_path):
    data = load_labelled(tars, img_size=32, check=False)
    store = frozen_features(model, data, tmp_path, shard_rows=16)
    _flip(Path(store.url) / "status" / "c" / "1", 3)
    with pytest.raises(HgkdError, match=r"feature cache's status is damaged .*delete the feature cache"):
        FeatureStore.open(store.url).status()
