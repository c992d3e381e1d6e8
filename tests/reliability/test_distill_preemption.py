"""Preemption of stage two (issue 21, item 2) and one trainer per run directory.

A real ``hgkd-distill run`` process gets SIGTERM mid-epoch: it stops at the next step
boundary with a checkpoint, one ``stopped:`` line and exit code 75; the same command again
continues it and ends bit-equal to the uninterrupted run. A second run in a directory that
a live process trains in stops with one line, and the first one finishes.
"""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from hgkd.distill.cli import main as distill_cli
from hgkd.errors import RESUMABLE_EXIT

from cli_results import assert_one_line_error, invoke

TINY = ["--student", "resnet18", "--sparse-backend", "masked", "--batch-size", "4", "--warmup-epochs", "0",
        "--queue-size", "16", "--decoder-width", "32", "--workers", "0"]


def command(cache: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--cache", cache, "--data", data, "--out", str(out), *TINY, *extra]


def metric_rows(run: Path) -> int:
    try:
        with (run / "metrics.csv").open(newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except FileNotFoundError:
        return 0


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hgkd.distill.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_rows(run: Path, proc: subprocess.Popen, rows: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and metric_rows(run) < rows and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before step {rows}: {proc.communicate()[1][-2000:]}"


def model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_sigterm_mid_epoch_then_the_same_command_equals_the_uninterrupted_run(f32_cache, photo_tars, tmp_path):
    args = lambda out: command(f32_cache, photo_tars, out, "--epochs", "3", "--resume", "auto")  # noqa: E731
    assert invoke(distill_cli, args(tmp_path / "ref")).returncode == 0  # 12 images / 4: 3 steps x 3 epochs

    run = tmp_path / "run"
    proc = start(args(run))
    wait_for_rows(run, proc, 4)  # step 4: the first of epoch 1
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == RESUMABLE_EXIT, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert stderr.count("stopped:") == 1 and "Traceback" not in stderr and last.startswith("stopped: "), stderr
    assert "SIGTERM at epoch 1 step " in last and "resumable: run the same command again" in last, last
    stopped_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    assert 4 <= stopped_at < 6, "stopped mid-epoch, with a checkpoint of that step (--checkpoint-every 0)"
    assert f"step {stopped_at};" in last

    again = subprocess.run([sys.executable, "-m", "hgkd.distill.cli", *args(run)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert metric_rows(run) == 9  # every step logged once
    want, got = model(tmp_path / "ref"), model(run)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_sigterm_to_a_run_started_without_resume_says_which_option_continues_it(f32_cache, photo_tars, tmp_path):
    run = tmp_path / "run"
    proc = start(command(f32_cache, photo_tars, run, "--epochs", "3"))
    wait_for_rows(run, proc, 2)
    proc.send_signal(signal.SIGUSR1)  # SLURM's early warning (--signal=USR1@120)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == RESUMABLE_EXIT, stderr[-3000:]
    assert "SIGUSR1 at epoch" in stderr and "resumable: run the same command with --resume auto" in stderr, stderr


def test_a_second_run_in_a_directory_being_trained_is_refused_and_the_first_finishes(f32_cache, photo_tars,
                                                                                      tmp_path):
    run = tmp_path / "run"
    first = start(command(f32_cache, photo_tars, run, "--epochs", "3", "--resume", "auto"))
    wait_for_rows(run, first, 1)
    for extra in (["--resume", "auto"], ["--resume"], []):
        second = invoke(distill_cli, command(f32_cache, photo_tars, run, "--epochs", "3", *extra))
        assert_one_line_error(second, f"{run} is being trained by process {first.pid} on ")
        assert "wait for it or use another --out" in second.stderr
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert metric_rows(run) == 9
    # the lock went with the process: the directory can be continued (a finished run: nothing to do)
    done = invoke(distill_cli, command(f32_cache, photo_tars, run, "--epochs", "3", "--resume", "auto"))
    assert done.returncode == 0 and "already trained to epoch 3 (9 steps)" in done.stdout, done.stderr
