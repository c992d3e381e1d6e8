"""The multi-node recipe of the README (issue 15) on one machine: two extraction ranks write
disjoint shards of one cache (the shared file system), then a two-process DDP distill reads
that cache and the tars over HTTP (the fsspec path, as from an object store) and equals the
same DDP run from local files."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import extract_args
from hgkd.storage.cache import FeatureCache
from range_http import serve


def losses(run: Path) -> dict[int, float]:
    with (run / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def ddp_distill(cache: str, data: str, out: Path, port: int, env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "hgkd.distill.cli", "run", "--cache", cache, "--data", data,
           "--out", str(out), "--student", "resnet18", "--sparse-backend", "masked", "--batch-size", "4",
           "--epochs", "1", "--warmup-epochs", "0", "--queue-size", "16", "--decoder-width", "64", "--workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_extraction_ranks_then_ddp_distill_over_http(photo_tars, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HGKD_SAMPLE_INDEX": str(tmp_path / "sample-index")}
    root = tmp_path / "shared"
    cache = root / "c.zarr"
    args = extract_args(photo_tars, str(cache), "--codec", "f32", "--shard-views", "4")
    ranks = [subprocess.Popen([sys.executable, "-m", "hgkd.extract.cli", *args, "--rank", str(r), "--world-size", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outputs = [p.communicate(timeout=600) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), outputs
    written = FeatureCache.open(str(cache))
    assert written.is_complete()
    writers = {s: written.shard_record(s)["writer"] for s in range(written.num_shards)}
    assert len(set(writers.values())) == 2, f"both ranks wrote shards: {writers}"

    (root / "tars").symlink_to(Path(photo_tars).parent, target_is_directory=True)
    ddp_distill(str(cache), photo_tars, tmp_path / "local", 29531, env)
    with serve(str(root)) as url:
        ddp_distill(f"{url}/c.zarr", f"{url}/tars/{Path(photo_tars).name}", tmp_path / "remote", 29533, env)
    want, got = losses(tmp_path / "local"), losses(tmp_path / "remote")
    assert sorted(want) == [1, 2, 3] and got == want  # 12 images, global batch 2 x 4
    w_local = torch.load(tmp_path / "local" / "checkpoints" / "last.pt", weights_only=True)["model"]
    w_remote = torch.load(tmp_path / "remote" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in w_local:
        torch.testing.assert_close(w_remote[name], w_local[name], rtol=0, atol=0, msg=name)
