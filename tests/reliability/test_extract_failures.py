"""Reliability of stage one: kills at several points, a full disk, damaged caches (issue #6)."""
from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from hgkd.storage.cache import FeatureCache
from hgkd.storage.verify import verify_cache

from conftest import extract_args, run_cli


def arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return {name: group[name][:] for name in group.array_keys()}


@pytest.fixture(scope="module")
def reference(photo_tars, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    assert run_cli(extract_args(photo_tars, out, "--shard-views", "4")).exit_code == 0
    return out


@pytest.mark.parametrize("kill_after_shards", [0, 2, 4])
def test_kill_9_at_several_points_then_resume_is_identical(photo_tars, reference, tmp_path, kill_after_shards):
    out = tmp_path / "c.zarr"
    args = extract_args(photo_tars, str(out), "--shard-views", "4")
    proc = subprocess.Popen([sys.executable, "-m", "hgkd.extract.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "shards" / f"{kill_after_shards:06d}"
    deadline = time.time() + 120
    while time.time() < deadline and not (marker.exists() if kill_after_shards else (out / "zarr.json").exists()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if FeatureCache.exists(str(out)):
        assert not FeatureCache.open(str(out)).is_complete()
    assert run_cli(args).exit_code == 0
    ref, got = arrays(reference), arrays(str(out))
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    report = verify_cache(str(out))
    assert report.ok and report.views_ok == 24


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))  # any file > 8 KiB: EFBIG


def test_full_disk_is_a_one_line_error_and_the_cache_stays_incomplete(photo_tars, tmp_path):
    out = tmp_path / "c.zarr"
    args = extract_args(photo_tars, str(out), "--codec", "f32", "--shard-views", "8")  # f32 token shards ~25 KiB
    result = subprocess.run([sys.executable, "-m", "hgkd.extract.cli", *args], capture_output=True, text=True,
                            preexec_fn=_limit_file_size)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: --out") and result.stderr.count("\n") == 1
    assert "re-run the same command to resume" in result.stderr
    cache = FeatureCache.open(str(out))
    assert not cache.is_complete() and cache.completed_shards() != set(range(cache.num_shards))
    assert not verify_cache(str(out)).ok
    assert run_cli(args).exit_code == 0 and verify_cache(str(out)).ok  # space back: resume finishes it


def test_truncated_shard_and_deleted_metadata_are_reported(photo_tars, tmp_path):
    out = tmp_path / "c.zarr"
    assert run_cli(extract_args(photo_tars, str(out))).exit_code == 0
    shard = out / "tokens" / "c" / "2" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    problems = verify_cache(str(out)).problems
    assert len(problems) == 1 and problems[0].startswith("shard 2 (rows 16-23): array 'tokens' is corrupt")
    (out / "zarr.json").unlink()
    result = run_cli(["verify", str(out)])
    assert result.exit_code == 2 and "no hgkd cache there" in result.output
