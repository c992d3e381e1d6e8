"""Reliability of a run's records (issue 11): metrics logged once per step across a kill and
``--resume``; fidelity measured only on a cache of the teacher the run learnt from."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from hgkd.distill.cli import main as distill_cli
from hgkd.distill.config import DistillConfig
from hgkd.distill.train import Trainer

from cli_results import assert_one_line_error, invoke
from conftest import extract_args, run_cli

TINY = dict(student="resnet18", sparse_backend="masked", batch_size=4, warmup_epochs=0, queue_size=16,
            decoder_width=32, workers=0, log_every=0)


def csv_steps(run: Path) -> list[int]:
    with (run / "metrics.csv").open(newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def tensorboard_steps(run: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


def test_resume_after_a_kill_logs_every_step_once(f32_cache, photo_tars, tmp_path):
    cfg = DistillConfig(cache=f32_cache, data=[photo_tars], out=str(tmp_path / "run"), epochs=2, checkpoint_every=2,
                        **TINY)  # 12 images / 4 = 3 steps per epoch
    Trainer(cfg).fit(stop_after_steps=3)  # like kill -9 after step 3: the checkpoint holds step 2
    assert csv_steps(tmp_path / "run") == [1, 2, 3]
    Trainer(cfg, resume=True).fit()
    assert csv_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def trained_run(f32_cache, photo_tars, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fidelity") / "run"
    Trainer(DistillConfig(cache=f32_cache, data=[photo_tars], out=str(run), epochs=1, **TINY)).fit()
    return run


@pytest.mark.parametrize("change", [["--teacher", "cae_tiny_patch16"], ["--init-seed", "1"]],
                         ids=["other-teacher-same-width", "other-weights"])
def test_fidelity_on_a_cache_of_another_teacher_is_refused(trained_run, f32_cache, photo_tars, tmp_path, change):
    other = str(tmp_path / "other.zarr")
    assert run_cli(extract_args(photo_tars, other, "--codec", "f32", *change)).exit_code == 0
    result = invoke(distill_cli, ["fidelity", str(trained_run), "--cache", other, "--data", photo_tars])
    assert_one_line_error(result, f"--cache {other}: made by another teacher than {trained_run}")
    control = invoke(distill_cli, ["fidelity", str(trained_run), "--cache", f32_cache, "--data", photo_tars])
    assert control.returncode == 0 and "token cosine" in control.stdout
