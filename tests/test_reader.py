"""`ShardReader` on real caches written by `hgkd-extract run`: equal to zarr-python, or loud."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from hgkd.errors import HgkdError
from hgkd.storage.cache import FeatureCache
from hgkd.storage.reader import ShardReader

from conftest import extract_args, run_cli

CACHES = {  # name -> extra 'hgkd-extract run' options; all have 24 views
    "int8ct": ["--codec", "int8ct"],  # shards of 8
    "bf16": ["--codec", "bf16"],
    "f32": ["--codec", "f32"],
    "int8ct-partial": ["--codec", "int8ct", "--shard-views", "10"],  # last shard holds 4 rows
}


@pytest.fixture(scope="module")
def caches(photo_tars, f32_cache, tmp_path_factory) -> dict[str, str]:
    """Complete caches written by the CLI, one per entry of CACHES."""
    out = {"f32": f32_cache}
    for name, options in CACHES.items():
        if name not in out:
            url = str(tmp_path_factory.mktemp("reader") / f"{name}.zarr")
            result = run_cli(extract_args(photo_tars, url, *options))
            assert result.exit_code == 0, result.output
            out[name] = url
    return out


@pytest.fixture
def int8_copy(caches, tmp_path) -> Path:
    """A private copy of the int8ct cache to damage."""
    return Path(shutil.copytree(caches["int8ct"], tmp_path / "c.zarr"))


def random_rows(n_views: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_views, size=40)  # unsorted, with repeats
    return np.concatenate([rows, rows[:3], [n_views - 1, 0]])


def assert_same(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("threads", [1, 2])
def test_read_equals_zarr_python_for_every_array(caches, name, threads):
    cache = FeatureCache.open(caches[name])
    reader = ShardReader(cache, threads=threads, lru_shards=2)  # smaller than the 3 shards: evictions
    for seed in range(3):
        rows = random_rows(cache.num_views, seed)
        assert_same(cache.read(rows), reader.read(rows))
    rows = random_rows(cache.num_views, 7)
    assert torch.equal(reader.read_tokens(rows), cache.read_tokens(rows))
    assert_same(cache.read([5], ["tokens", "key"]), reader.read([5], ["tokens", "key"]))
    assert reader.read(np.array([], dtype=np.int64), ["tokens"])["tokens"].shape == (0, 16, 64)


def test_arrays_argument_selects_default_output(caches):
    cache = FeatureCache.open(caches["bf16"])
    reader = ShardReader(cache, ["tokens", "pooled"])
    assert set(reader.read([3, 1])) == {"tokens", "pooled"}
    with pytest.raises(HgkdError, match="no per-view arrays named"):
        ShardReader(cache, ["tokens", "nope"])
    with pytest.raises(IndexError):
        reader.read([cache.num_views])


def test_non_local_store_falls_back_to_zarr_python(caches):
    cache = FeatureCache.open("file://" + caches["int8ct"])  # fsspec store: no local directory
    assert cache.local_dir is None
    rows = random_rows(cache.num_views, 1)
    assert_same(FeatureCache.open(caches["int8ct"]).read(rows), ShardReader(cache).read(rows))


def _token_chunk(reader: ShardReader, row: int) -> tuple[Path, int, int]:
    """File, offset and size of one row's chunk inside its ``tokens`` shard file."""
    tokens = reader._reader("tokens")
    shard = row // reader.cache.shard_views
    _, index = tokens.shard_file(shard, {shard})
    offset, nbytes = index[row - shard * reader.cache.shard_views]
    return Path(tokens.path(shard)), int(offset), int(nbytes)


def _flip(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_flipped_byte_in_a_tokens_chunk_raises_naming_the_shard(int8_copy):
    cache = FeatureCache.open(str(int8_copy))
    path, offset, nbytes = _token_chunk(ShardReader(cache), 10)
    _flip(path, offset + nbytes // 2)
    reader = ShardReader(cache)
    with pytest.raises(HgkdError, match=r"array 'tokens', shard 1 \(rows 8-15\) is corrupt: the chunk of row 10"):
        reader.read([3, 10, 20])
    good = [3, 9, 11, 20]  # the rest of that shard still reads, and equals zarr-python
    assert_same(cache.read(good), reader.read(good))


def test_flipped_byte_in_a_shard_index_or_small_chunk_raises(int8_copy):
    cache = FeatureCache.open(str(int8_copy))
    path, _, _ = _token_chunk(ShardReader(cache), 17)
    _flip(path, path.stat().st_size - 10)  # inside the index at the end of the shard file
    with pytest.raises(HgkdError, match=r"'tokens', shard 2 \(rows 16-23\) is corrupt: the shard index"):
        ShardReader(cache).read([17])
    _flip(int8_copy / "pooled" / "c" / "0" / "0", 30)
    with pytest.raises(HgkdError, match=r"'pooled', shard 0 \(rows 0-7\) is corrupt"):
        ShardReader(cache, ["pooled"]).read([1])


def test_chunk_missing_from_a_shard_raises_instead_of_fill_values(int8_copy):
    """A row whose chunk zarr dropped (all fill value, written without write_empty_chunks)."""
    tokens = zarr.open_array(str(int8_copy / "tokens"), mode="r+").with_config({"write_empty_chunks": False})
    tokens[13] = 0
    cache = FeatureCache.open(str(int8_copy))
    assert not cache.read([13], ["tokens"])["tokens"].any()  # zarr-python silently gives zeros
    with pytest.raises(HgkdError, match=r"shard 1 \(rows 8-15\): row 13 was never written"):
        ShardReader(cache).read([12, 13])


@pytest.mark.parametrize("file", ["tokens/c/1/0/0", "token_scale/c/1/0"])
def test_deleted_shard_file_raises(int8_copy, file):
    (int8_copy / file).unlink()
    cache = FeatureCache.open(str(int8_copy))
    with pytest.raises(HgkdError, match=r"shard 1 \(rows 8-15\): shard file .* is missing"):
        ShardReader(cache).read([2, 12])
    assert len(ShardReader(cache).read([2, 20])["tokens"]) == 2  # other shards still serve


def test_rows_of_a_shard_without_completion_record_are_refused(int8_copy):
    shutil.rmtree(int8_copy / "shards" / "000001")
    cache = FeatureCache.open(str(int8_copy))
    reader = ShardReader(cache)
    with pytest.raises(HgkdError, match=r"shard 1 \(rows 8-15\) has no completion record"):
        reader.read([0, 9])
    assert_same(cache.read([0, 17]), reader.read([0, 17]))


class _Batches(Dataset):
    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.cache.num_views

    def __getitem__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self.reader.read(rows, ["tokens", "token_scale", "channel_scale"])


def test_pickle_round_trip_and_dataloader_workers(caches):
    cache = FeatureCache.open(caches["int8ct"])
    reader = ShardReader(cache, threads=2)
    rows = random_rows(cache.num_views, 3)
    expected = cache.read(rows)
    assert_same(expected, reader.read(rows))  # files, indexes, threads are live now
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._readers == {} and clone._pool is None
    assert_same(expected, clone.read(rows))
    batches = [random_rows(cache.num_views, seed)[:16] for seed in range(6)]
    loader = DataLoader(_Batches(reader), batch_size=None, sampler=batches, num_workers=2, timeout=60)
    for rows_b, got in zip(batches, loader):  # forked workers inherit a reader with open files
        want = cache.read(rows_b, ["tokens", "token_scale", "channel_scale"])
        for name, value in want.items():
            np.testing.assert_array_equal(got[name].numpy(), value)
