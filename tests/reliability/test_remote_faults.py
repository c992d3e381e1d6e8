"""Remote reads that survive a flaky store (issue 21, item 1): a fault-injecting loopback HTTP
server (``tests/fault_http.py``: resets, 503/429, stalls, truncated bodies) serves the tars and
the cache; transient faults are retried and counted, permanent answers are one line at once,
a store that dies is "unreachable" (never "damaged"), and a tar changed in place is one line."""
from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hgkd import remote
from hgkd.data.random_access import open_random_access
from hgkd.distill.cli import main as distill_cli
from hgkd.errors import HgkdError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fault_http import KINDS, faults_by_kind, serve_faults, unrepaired_truncations  # noqa: E402


@pytest.fixture(autouse=True)
def quick_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("HGKD_SAMPLE_INDEX", str(tmp_path / "sample-index"))
    monkeypatch.setenv("HGKD_REMOTE_TIMEOUT", "0.5")  # the server's stalls last 1.5 s
    monkeypatch.setenv("HGKD_REMOTE_RETRIES", "8")
    monkeypatch.setenv("HGKD_REMOTE_RETRY_SECONDS", "30")
    remote.configure()
    yield
    remote._policy = None


@pytest.fixture
def www(photo_tars, f32_cache, tmp_path) -> Path:
    root = tmp_path / "www"
    shutil.copytree(Path(photo_tars).parent, root / "tars")
    shutil.copytree(f32_cache, root / "f32.zarr")
    return root


def distill(cache: str, data: str, out: Path, *extra: str):
    args = ["run", "--cache", cache, "--data", data, "--out", str(out), "--student", "resnet18",
            "--sparse-backend", "masked", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
            "--queue-size", "16", "--decoder-width", "64", "--workers", "0", *extra]
    return CliRunner().invoke(distill_cli, args, catch_exceptions=False)


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and "Traceback" not in result.output, result.output
    line = "error: " + result.output.rsplit("error: ", 1)[1].strip()  # (a progress bar may share its line)
    assert "\n" not in line, result.output
    return line


def test_distill_through_faults_equals_the_clean_local_run(photo_tars, f32_cache, www, tmp_path):
    local = distill(f32_cache, photo_tars, tmp_path / "local")
    assert local.exit_code == 0, local.output
    before = sum(remote.retry_counts().values())
    with serve_faults(str(www), rate=0.08, seed=1) as server:
        result = distill(f"{server.url}/f32.zarr", f"{server.url}/tars/{Path(photo_tars).name}", tmp_path / "remote")
        injected = faults_by_kind(server)
        unrepaired = unrepaired_truncations(server)
    assert result.exit_code == 0, result.output
    assert unrepaired == (0, 0), "every truncated body was read again in full"
    retries = sum(remote.retry_counts().values()) - before
    assert sum(injected.values()) >= len(KINDS) and set(injected) == set(KINDS), injected
    # not one retry per fault: aiohttp re-sends once on a dropped keep-alive connection, and fsspec's
    # info() falls back from HEAD to GET by itself
    # short answers and flipped shard bytes pass HTTP: only hgkd's length and crc32c checks catch them
    assert retries > 0 and {"http_503", "http_429", "timeout", "short_read", "crc"} <= set(remote.retry_counts()), \
        remote.retry_counts()
    want = torch.load(tmp_path / "local" / "checkpoints" / "last.pt", weights_only=True)["model"]
    got = torch.load(tmp_path / "remote" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    with (tmp_path / "remote" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert "remote_retries" in rows[0], f"metrics.csv has no remote_retries column: {list(rows[0])}"
    assert max(float(r["remote_retries"]) for r in rows) > 0


def test_not_found_forbidden_and_changed_etag_are_one_line_at_once(photo_tars, www):
    with serve_faults(str(www), rate=0.0) as server:
        tars = f"{server.url}/tars/{Path(photo_tars).name}"
        server.forbidden.add("/tars/part-001.tar")
        before = remote.retry_counts()
        for spec, words in ((f"{server.url}/tars/nope.tar", "no such file"), (tars, "refused access (HTTP 403)")):
            started = time.monotonic()
            with pytest.raises(HgkdError, match=words.replace("(", r"\(").replace(")", r"\)")):
                open_random_access(spec)
            assert time.monotonic() - started < 2
        server.forbidden.clear()
        source = open_random_access(tars)
        assert source.read(0) is not None
        tar = www / "tars" / "part-002.tar"
        data = tar.read_bytes()
        tar.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, new ETag
        started = time.monotonic()
        with pytest.raises(HgkdError, match=r"part-002\.tar changed since this run indexed it"):
            source.read(len(source.keys) - 1)
        assert time.monotonic() - started < 2
        assert remote.retry_counts() == before, "permanent answers are not retried"


def test_a_server_that_dies_mid_run_is_unreachable_not_damaged(photo_tars, www, tmp_path):
    with serve_faults(str(www), rate=0.0) as server:
        server.kill_after(7, ".tar")  # 3 index scans, then one batch; the second batch finds it dead
        started = time.monotonic()
        result = distill(f"{server.url}/f32.zarr", f"{server.url}/tars/{Path(photo_tars).name}", tmp_path / "run",
                         "--remote-retries", "3", "--remote-retry-seconds", "3")
    line = one_line(result)
    assert "unreachable" in line and server.url in line and "cache is damaged" not in line and "verify" not in line, line
    assert "--remote-retries" in line
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("where", ["local", "http"])
def test_a_tar_changed_in_place_is_one_line(photo_tars, f32_cache, www, tmp_path, where):
    tar = www / "tars" / "part-001.tar"
    source = open_random_access(str(tar))
    first = 0  # part-001's first sample (global index 4)
    offset, size = int(source._offsets[first]), int(source._sizes[first])
    data = bytearray(tar.read_bytes())
    data[offset + 2 : offset + size] = bytes(size - 2)  # same size, the image body zeroed
    tar.write_bytes(bytes(data))
    spec = str(www / "tars" / Path(photo_tars).name)
    if where == "local":
        result = distill(f32_cache, spec, tmp_path / "run")
    else:
        with serve_faults(str(www), rate=0.0) as server:
            result = distill(f"{server.url}/f32.zarr", f"{server.url}/tars/{Path(photo_tars).name}", tmp_path / "run")
    line = one_line(result)
    assert "part-001.tar" in line and "re-extract" in line, line
