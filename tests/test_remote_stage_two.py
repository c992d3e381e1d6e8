"""Stage two from remote data and a remote cache (issue 15), through fsspec without network:
a loopback HTTP server that answers Range requests, and fsspec's memory filesystem."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hgkd.data.random_access import open_random_access
from hgkd.distill.cli import main as distill_cli
from hgkd.distill.data import CacheViewDataset
from hgkd.errors import HgkdError
from hgkd.storage.cache import FeatureCache
from hgkd.storage.reader import ShardReader
from range_http import serve


@pytest.fixture(autouse=True)
def index_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HGKD_SAMPLE_INDEX", str(tmp_path / "sample-index"))


@pytest.fixture
def served(photo_tars, f32_cache, tmp_path):
    """Copies of the tars and the cache under one folder, served on loopback."""
    root = tmp_path / "www"
    shutil.copytree(Path(photo_tars).parent, root / "tars")
    shutil.copytree(f32_cache, root / "f32.zarr")
    with serve(str(root)) as url:
        yield root, url, f"{url}/tars/{Path(photo_tars).name}", f"{url}/f32.zarr"


def distill(cache: str, data: str, out: Path, workers: int = 0) -> CliRunner:
    args = ["run", "--cache", cache, "--data", data, "--out", str(out), "--student", "resnet18",
            "--sparse-backend", "masked", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
            "--queue-size", "16", "--decoder-width", "64", "--workers", str(workers)]
    return CliRunner().invoke(distill_cli, args, catch_exceptions=False)


def losses(run: Path) -> dict[int, float]:
    with (run / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_shard_reader_over_http_and_memory_equals_local(f32_cache, served):
    _, _, _, http_cache = served
    fs = fsspec.filesystem("memory")
    fs.put(f32_cache, "/remote-test/f32.zarr", recursive=True)
    local = ShardReader(FeatureCache.open(f32_cache))
    rows = np.array([17, 0, 5, 5, 9, 23])
    want = local.read(rows)
    for url in (http_cache, "memory://remote-test/f32.zarr"):
        cache = FeatureCache.open(url)
        assert cache.local_dir is None
        reader = ShardReader(cache)
        got = reader.read(rows)
        assert type(reader._readers["tokens"]).__name__ == "_ShardedRows", "ranged shard reads, not zarr's path"
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{url} {name}")
    fs.rm("/remote-test", recursive=True)


def test_remote_data_reads_the_same_bytes_as_local(photo_tars, served, tmp_path):
    _, _, http_tars, _ = served
    fs = fsspec.filesystem("memory")
    fs.put(str(Path(photo_tars).parent), "/remote-test/tars", recursive=True)
    local = open_random_access(photo_tars)
    want = [local.read(i) for i in range(len(local.keys))]
    for spec in (http_tars, f"memory://remote-test/tars/{Path(photo_tars).name}"):
        remote = open_random_access(spec)
        assert remote.keys == local.keys and remote.labels == local.labels
        assert [remote.read(i) for i in range(len(local.keys))] == want, spec
    assert len(list((tmp_path / "sample-index").glob("*.npz"))) == 3  # remote tars are indexed too
    fs.rm("/remote-test", recursive=True)


@pytest.mark.parametrize("workers", [0, 2])  # 2: forked DataLoader workers open their own HTTP clients
def test_distill_from_http_data_and_cache_equals_local(photo_tars, f32_cache, served, tmp_path, workers):
    _, _, http_tars, http_cache = served
    result = distill(f32_cache, photo_tars, tmp_path / "local")
    assert result.exit_code == 0, result.output
    result = distill(http_cache, http_tars, tmp_path / "remote", workers)
    assert result.exit_code == 0, result.output
    want, got = losses(tmp_path / "local"), losses(tmp_path / "remote")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    assert got == want
    w_local = torch.load(tmp_path / "local" / "checkpoints" / "last.pt", weights_only=True)["model"]
    w_remote = torch.load(tmp_path / "remote" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in w_local:
        torch.testing.assert_close(w_remote[name], w_local[name], rtol=0, atol=0, msg=name)


def test_unreachable_url_is_one_line_and_writes_nothing(photo_tars, f32_cache, tmp_path):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    for cache, data in ((f"{dead}/f32.zarr", photo_tars), (f32_cache, f"{dead}/part-000.tar")):
        out = tmp_path / "never"
        result = CliRunner().invoke(distill_cli, ["run", "--cache", cache, "--data", data, "--out", str(out),
                                                  "--student", "resnet18"])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert line.startswith("error: ") and line.count("\n") == 0 and "127.0.0.1:9" in line, line
        assert not out.exists()


def test_a_remote_tar_changed_since_indexing_is_refused(photo_tars, served):
    root, _, http_tars, _ = served
    source = open_random_access(http_tars)
    assert source.read(0) is not None
    tar = root / "tars" / "part-002.tar"
    tar.write_bytes(tar.read_bytes())  # same bytes, new version (mtime, ETag)
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    with pytest.raises(HgkdError, match=r"part-002\.tar changed since this run indexed it"):
        source.read(len(source.keys) - 1)
    again = open_random_access(http_tars)  # a new start indexes it again
    assert again.read(len(again.keys) - 1) == open_random_access(photo_tars).read(len(again.keys) - 1)


def test_an_incomplete_remote_cache_is_one_line(photo_tars, served):
    root, _, http_tars, http_cache = served
    shutil.rmtree(root / "f32.zarr" / "shards" / "000001")
    meta = root / "f32.zarr" / "zarr.json"
    meta.write_text(meta.read_text().replace('"status": "complete"', '"status": "incomplete"'))
    with pytest.raises(HgkdError, match=r"f32\.zarr is incomplete"):
        CacheViewDataset(http_cache, [http_tars])
    cache = FeatureCache.open(http_cache)
    with pytest.raises(HgkdError, match=r"shard 1 \(rows 8-15\) has no completion record"):
        ShardReader(cache).read([9])
