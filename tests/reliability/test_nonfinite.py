"""Non-finite losses (issue 21, item 4): a step whose loss terms or gradient norm are not
finite is never applied. Injected for real: a run continued with ``--tau 1e-45`` (a
subnormal temperature: L_sim's logits overflow to inf) after one good epoch."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from hgkd.distill.cli import main as distill_cli

from cli_results import assert_one_line_error, invoke

TINY = ["--student", "resnet18", "--sparse-backend", "masked", "--batch-size", "4", "--warmup-epochs", "0",
        "--queue-size", "16", "--decoder-width", "32", "--workers", "0", "--resume", "auto"]


def command(cache: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--cache", cache, "--data", data, "--out", str(out), *TINY, *extra]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def good_epoch(cache: str, data: str, run: Path) -> bytes:
    assert invoke(distill_cli, command(cache, data, run, "--epochs", "1")).returncode == 0  # steps 1-3
    return (run / "checkpoints" / "last.pt").read_bytes()


def test_a_non_finite_step_stops_the_run_with_one_line_and_the_checkpoint_unharmed(f32_cache, photo_tars,
                                                                                   tmp_path):
    run = tmp_path / "run"
    before = good_epoch(f32_cache, photo_tars, run)
    result = invoke(distill_cli, command(f32_cache, photo_tars, run, "--epochs", "2", "--tau", "1e-45"))
    last = result.stderr.strip().splitlines()[-1]  # after the run's notes (backend, pixel check)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: {run}: non-finite loss at epoch 1 step 4 (" in last, last
    terms = last.split("non-finite loss at epoch 1 step 4 (", 1)[1].split(")", 1)[0]
    assert "sim=nan" in terms and "mse=" not in terms, terms  # only the non-finite terms are named
    assert f"last good checkpoint {run / 'checkpoints' / 'last.pt'} (step 3)" in result.stderr
    assert "--nonfinite skip" in result.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == before  # nothing written over the good one
    assert all(torch.isfinite(v).all() for v in checkpoint(run)["model"].values() if v.is_floating_point())


def test_with_nonfinite_skip_the_run_completes_and_counts_the_skipped_steps(f32_cache, photo_tars, tmp_path):
    run = tmp_path / "run"
    good_epoch(f32_cache, photo_tars, run)
    good = checkpoint(run)
    result = invoke(distill_cli, command(f32_cache, photo_tars, run, "--epochs", "2", "--tau", "1e-45",
                                         "--nonfinite", "skip"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 non-finite steps skipped" in result.stdout
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["skipped_steps"]) for r in rows] == [0, 0, 0, 1, 2, 3]
    assert [int(r["remote_retries"]) for r in rows] == [0] * 6  # local files: no retries
    done = checkpoint(run)
    assert done["global_step"] == 6 and done["counters"]["skipped_steps"] == 3
    for name, value in good["model"].items():  # weights and BatchNorm statistics as after the good epoch
        assert torch.equal(done["model"][name], value), name
    for name, value in good["method"].items():  # H-GKD's queue: the skipped steps' pushes were undone
        assert torch.equal(done["method"][name], value), name


def test_out_of_range_tau_and_lr_never_train_to_nan_weights(f32_cache, photo_tars, tmp_path):
    for option, value in (("--tau", "0"), ("--lr", "1e12")):
        run = tmp_path / option.strip("-")
        result = invoke(distill_cli, command(f32_cache, photo_tars, run, "--epochs", "1", option, value))
        assert_one_line_error(result, option)
        assert not (run / "checkpoints" / "last.pt").exists()
