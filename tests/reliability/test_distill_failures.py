"""Reliability of stage two: resuming on other teacher targets, a cache whose token grid the
student cannot produce, a run directory that cannot be created (issue #6). Each case must end
in one ``error: --option ...`` line, exit code 2, and write nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from hgkd.distill.cli import main as distill_cli

from cli_results import assert_one_line_error, invoke
from conftest import extract_args, run_cli

TINY_RUN = ["--student", "resnet18", "--sparse-backend", "masked", "--batch-size", "8", "--epochs", "1",
            "--warmup-epochs", "0", "--queue-size", "16", "--decoder-width", "32", "--workers", "0"]


def distill_args(cache: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--cache", cache, "--data", data, "--out", str(out), *TINY_RUN, *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(f32_cache, photo_tars, tmp_path_factory) -> Path:
    """One finished epoch of a tiny run on the f32 cache (mae_vit_tiny_patch16, 64 px, 4x4 grid)."""
    run = tmp_path_factory.mktemp("distill") / "run"
    result = invoke(distill_cli, distill_args(f32_cache, photo_tars, run))
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.parametrize("change", [
    ["--teacher", "cae_tiny_patch16"],  # same grid and width: only the fingerprint tells
    ["--init-seed", "1"],  # same teacher, other weights (as another checkpoint)
    ["--teacher", "mae_vit_mini_patch16"],  # width 128 instead of 64
    ["--img-size", "96"],  # grid 6x6 instead of 4x4
], ids=["other-teacher", "other-weights", "other-width", "other-grid"])
def test_resume_on_a_cache_of_other_teacher_targets_is_refused(trained_run, f32_cache, photo_tars, tmp_path,
                                                               change):
    other = str(tmp_path / "other.zarr")
    assert run_cli(extract_args(photo_tars, other, *change)).exit_code == 0
    before = snapshot(trained_run)
    result = invoke(distill_cli, distill_args(other, photo_tars, trained_run, "--resume"))
    assert_one_line_error(result, f"--resume: {trained_run} was trained on other teacher targets")
    assert "--cache" in result.stderr  # says what to pass instead
    assert snapshot(trained_run) == before
    # Control: the same command on the original cache resumes (the run is finished: no steps).
    assert invoke(distill_cli, distill_args(f32_cache, photo_tars, trained_run, "--resume")).returncode == 0


def test_fresh_run_on_a_grid_the_student_cannot_produce_is_refused(photo_tars, tmp_path):
    cache = str(tmp_path / "c48.zarr")
    assert run_cli(extract_args(photo_tars, cache, "--img-size", "48")).exit_code == 0  # 48 % 16 == 0: accepted
    run = tmp_path / "run"
    result = invoke(distill_cli, distill_args(cache, photo_tars, run))
    assert_one_line_error(result, f"--cache {cache}")
    assert "48" in result.stderr  # names the image size to change at extraction
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()


def test_online_teacher_at_a_size_the_student_cannot_produce_is_refused(photo_tars, tmp_path):
    run = tmp_path / "run"
    args = ["run", "--online-teacher", "mae_vit_tiny_patch16", "--img-size", "48", "--data", photo_tars,
            "--out", str(run), *TINY_RUN]
    result = invoke(distill_cli, args)
    assert_one_line_error(result, "--img-size")
    assert "48" in result.stderr
    assert not run.exists()


@pytest.mark.parametrize("where", ["parent-is-a-file", "out-is-a-file"])
def test_run_dir_that_cannot_be_a_directory_is_a_one_line_error(f32_cache, photo_tars, tmp_path, where):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a regular file\n")
    out = blocker / "run" if where == "parent-is-a-file" else blocker
    result = invoke(distill_cli, distill_args(f32_cache, photo_tars, out))
    assert_one_line_error(result, f"--out {out}")
    assert blocker.read_bytes() == b"a regular file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]
