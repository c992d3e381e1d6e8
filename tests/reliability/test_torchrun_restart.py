"""``torchrun --max-restarts 1`` with one rank killed once (issue 21, item 3): one command line,
``--resume auto``, starts the run and, after torchrun restarts every rank, continues it from
the last checkpoint; the run completes and its weights equal the uninterrupted two-rank run."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from processes import rank_pid

TINY = ["--student", "resnet18", "--sparse-backend", "masked", "--batch-size", "4", "--epochs", "3",
        "--warmup-epochs", "0", "--queue-size", "16", "--decoder-width", "32", "--workers", "0",
        "--checkpoint-every", "1", "--resume", "auto"]


def torchrun(cache: str, data: str, out: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
            "-m", "hgkd.distill.cli", "run", "--cache", cache, "--data", data, "--out", str(out), *TINY]


def metric_rows(run: Path) -> int:
    try:
        with (run / "metrics.csv").open(newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (FileNotFoundError, StopIteration):
        return 0


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def started(proc: subprocess.Popen, run: Path, steps: int) -> None:
    """Wait until ``run`` has logged ``steps`` steps (or the job ended)."""
    deadline = time.time() + 240
    while time.time() < deadline and metric_rows(run) < steps and proc.poll() is None:
        time.sleep(0.02)


def assert_same_weights(want_run: Path, got_run: Path) -> None:
    want, got = weights(want_run), weights(got_run)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# the README's recipe: without it a restarted rank can read the killed attempt's addresses from the
# shared rendezvous store and fail to connect (pytorch#135712; seen here, about one restart in three)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def reference(f32_cache, photo_tars, tmp_path_factory) -> Path:
    """The uninterrupted two-rank run."""
    out = tmp_path_factory.mktemp("torchrun") / "ref"
    done = subprocess.run(torchrun(f32_cache, photo_tars, out, 29541), capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_torchrun_restart_after_a_killed_rank_equals_the_uninterrupted_run(f32_cache, photo_tars, tmp_path,
                                                                          reference):
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun(f32_cache, photo_tars, run, 29543), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    started(proc, run, steps=4)
    victim = rank_pid(proc.pid, 1)
    assert victim is not None and proc.poll() is None, "rank 1 must be running after 4 of 9 steps"
    os.kill(victim, signal.SIGKILL)
    killed_at = metric_rows(run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert killed_at < 9, "the kill must land before the last step"
    assert err.count("sparse backend:") == 2, err[-3000:]  # rank 0 started twice: torchrun restarted the ranks
    assert_same_weights(reference, run)


def test_sigterm_to_torchrun_stops_every_rank_with_a_checkpoint_and_the_same_command_continues(
        f32_cache, photo_tars, tmp_path, reference):
    """A preempted DDP job: torchrun passes SIGTERM to the ranks; they stop at one step, rank 0
    writes its checkpoint while the others wait, and the same command again equals the uninterrupted run."""
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun(f32_cache, photo_tars, run, 29545), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    started(proc, run, steps=4)
    assert proc.poll() is None, "torchrun must be running after 4 of 9 steps"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("stopped: ") == 2 and "resumable: run the same command again" in err, err[-3000:]  # both ranks
    stopped_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    assert stopped_at == metric_rows(run) and 4 <= stopped_at < 9, "the checkpoint is the step the ranks stopped at"
    again = subprocess.run(torchrun(f32_cache, photo_tars, run, 29547), capture_output=True, text=True, timeout=300,
                           env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(reference, run)


def test_restarts_over_a_shared_rendezvous_store_are_warned_about_once(monkeypatch, caplog):
    from hgkd.devices import warn_shared_store_restarts

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("RANK", "0")
    for shared, warned in (("True", 1), ("False", 0)):
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
        caplog.clear()
        warn_shared_store_restarts()
        assert sum("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in r.getMessage() for r in caplog.records) == warned
