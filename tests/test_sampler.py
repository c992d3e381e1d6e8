"""Chunk-aware batch sampler: coverage, locality, determinism, DDP split and resume."""
import numpy as np
import pytest

from hgkd.distill.data import ChunkAwareBatchSampler
from hgkd.errors import HgkdError

ROWS = np.delete(np.arange(200), [5, 77, 130])  # skipped views are absent


def test_each_epoch_covers_rows_once_in_few_shards():
    s = ChunkAwareBatchSampler(ROWS, shard_views=16, batch_size=8, seed=1, window=2)
    batches = list(s)
    flat = np.concatenate(batches)
    assert len(batches) == len(s) == len(ROWS) // 8
    assert len(set(flat.tolist())) == len(flat) and set(flat.tolist()) <= set(ROWS.tolist())
    shards_per_batch = [len(set((np.asarray(b) // 16).tolist())) for b in batches]
    assert max(shards_per_batch) <= 4  # a batch may straddle two windows of 2 shards
    assert np.mean(shards_per_batch) <= 2.5  # uniform random batches of 8 over 13 shards touch ~6


def test_epochs_differ_and_are_reproducible():
    a = ChunkAwareBatchSampler(ROWS, 16, 8, seed=1)
    b = ChunkAwareBatchSampler(ROWS, 16, 8, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)


def test_ranks_partition_the_batches_and_resume_skips():
    full = ChunkAwareBatchSampler(ROWS, 16, 8, seed=0)
    ranks = [ChunkAwareBatchSampler(ROWS, 16, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert sorted(map(tuple, list(ranks[0]) + list(ranks[1]))) == sorted(map(tuple, list(full)[: 2 * len(ranks[0])]))
    resumed = ChunkAwareBatchSampler(ROWS, 16, 8, seed=0)
    resumed.set_epoch(0, start_batch=5)
    assert list(resumed) == list(full)[5:]


def test_batch_larger_than_data_is_a_clear_error():
    with pytest.raises(HgkdError, match="--batch-size 500"):
        ChunkAwareBatchSampler(ROWS, 16, 500)
