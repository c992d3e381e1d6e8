"""Preemption of stage one (issue 21, item 2): SIGTERM to a real ``hgkd-extract run`` process
mid-run stops it at a batch boundary with one ``stopped:`` line and exit code 75; the same
command again finishes a cache equal, array for array, to an uninterrupted run's."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from hgkd.data.demo_data import SKIMAGE_IMAGES, _jpeg, _load
from hgkd.errors import RESUMABLE_EXIT
from hgkd.storage.cache import FeatureCache
from hgkd.storage.verify import verify_cache

from conftest import extract_args, run_cli
from test_extract_failures import arrays

SAMPLES = 36  # 72 views in shards of 16: five shards of four batches, so a stop lands mid-shard


@pytest.fixture(scope="module")
def many_tars(tmp_path_factory) -> str:
    """36 real photos (the 12 first, three times, under distinct keys) in 3 tars."""
    out = tmp_path_factory.mktemp("preempt-tars")
    names = list(SKIMAGE_IMAGES[:12])
    samples = [{"__key__": f"img/{i:03d}-{names[i % 12]}", "jpg": _jpeg(_load(names[i % 12])), "cls": str(i % 12)}
               for i in range(SAMPLES)]
    for s in range(3):
        with wds.TarWriter(str(out / f"p-{s:03d}.tar")) as sink:
            for sample in samples[s * 12:(s + 1) * 12]:
                sink.write(sample)
    return str(out / "p-{000..002}.tar")


def _args(data: str, out: Path) -> list[str]:
    return extract_args(data, str(out), "--shard-views", "16", "--workers", "1")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_mid_shard_then_same_command_equals_uninterrupted(many_tars, tmp_path, sig):
    reference = tmp_path / "ref.zarr"
    assert run_cli(_args(many_tars, reference)).exit_code == 0
    out = tmp_path / "c.zarr"
    args = _args(many_tars, out)
    proc = subprocess.Popen([sys.executable, "-m", "hgkd.extract.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker = out / "shards" / "000000"  # shard 0 recorded: the run is inside shard 1 or later
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == RESUMABLE_EXIT, stderr[-3000:]
    assert stderr.count("\n") == 1 and stdout == "", stderr[-3000:]
    found = re.fullmatch(rf"stopped: {re.escape(str(out))}: {sig.name} after (\d+) of 72 views; resumable: run the "
                         r"same command again\n", stderr)
    assert found, stderr
    views = int(found.group(1))
    cache = FeatureCache.open(str(out))
    done = cache.completed_shards()
    assert 16 <= views < 72 and views == sum(len(cache.shard_rows(s)) for s in done) and not cache.is_complete()

    again = subprocess.run([sys.executable, "-m", "hgkd.extract.cli", *args], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"wrote {72 - views} views" in again.stdout  # only the missing shards were extracted
    ref, got = arrays(str(reference)), arrays(str(out))
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    report = verify_cache(str(out))
    assert report.ok and report.views_ok == 72



@pytest.mark.parametrize("stop_after_batches, kept_views", [(6, 16), (8, 32)])
def test_stop_drops_a_partial_shard_and_keeps_a_full_one(many_tars, tmp_path, monkeypatch, stop_after_batches,
                                                         kept_views):
    """Deterministic placement: a real SIGTERM to this process after batch K (four per shard).
    After batch 6 (mid shard 1) shard 1 is dropped; after batch 8 (its last) it is kept."""
    from hgkd.extract.run import Extractor

    reference = tmp_path / "ref.zarr"
    assert run_cli(_args(many_tars, reference)).exit_code == 0
    rows_for, seen = Extractor.rows_for, []

    def rows_then_signal(self, *a, **kw):
        rows_for(self, *a, **kw)
        seen.append(1)
        if len(seen) == stop_after_batches:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Extractor, "rows_for", rows_then_signal)
    out = tmp_path / "c.zarr"
    result = run_cli(_args(many_tars, out))
    assert result.exit_code == RESUMABLE_EXIT, result.output
    assert f"SIGTERM after {kept_views} of 72 views" in result.output and len(seen) == stop_after_batches
    assert sorted(FeatureCache.open(str(out)).completed_shards()) == list(range(kept_views // 16))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.undo()
    again = run_cli(_args(many_tars, out))
    assert again.exit_code == 0 and f"wrote {72 - kept_views} views" in again.output, again.output
    ref, got = arrays(str(reference)), arrays(str(out))
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
