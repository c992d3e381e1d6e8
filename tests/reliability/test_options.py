"""Options and config files checked before anything is written (issue 11): each mistake is one
``error: ...`` line, exit code 2, and leaves no cache or run directory behind."""
from __future__ import annotations

import pytest

from hgkd.distill.cli import main as distill_cli
from hgkd.extract.cli import main as extract_cli

from cli_results import assert_one_line_error, invoke
from conftest import extract_args


@pytest.mark.parametrize("option,value", [("--shard-views", "0"), ("--shard-views", "-16"), ("--img-size", "0"),
                                          ("--batch-size", "0"), ("--batch-size", "-4")])
def test_extract_sizes_below_one_are_refused_before_the_cache_is_made(photo_tars, tmp_path, option, value):
    out = tmp_path / "c.zarr"
    result = invoke(extract_cli, [*extract_args(photo_tars, str(out)), option, value])
    assert_one_line_error(result, f"{option} {value} must be at least 1")
    assert list(tmp_path.iterdir()) == []  # no cache, no .locks folder


def distill_with_config(tmp_path, text: str, f32_cache: str, photo_tars: str):
    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    args = ["run", "--config", str(config), "--cache", f32_cache, "--data", photo_tars, "--out", str(tmp_path / "run"),
            "--student", "resnet18", "--sparse-backend", "masked", "--workers", "0"]
    return config, invoke(distill_cli, args)


@pytest.mark.parametrize("text,message", [
    ("epochs: one\n", "epochs: expected an integer, got 'one'"),
    ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ("similarity: 3\n", "similarity: expected true or false, got 3"),
    ("crop_scale: [0.2]\n", "crop_scale: expected a list of 2, got [0.2]"),
])
def test_config_values_of_the_wrong_type_are_one_line(f32_cache, photo_tars, tmp_path, text, message):
    config, result = distill_with_config(tmp_path, text, f32_cache, photo_tars)
    assert_one_line_error(result, f"{config}: {message}")
    assert not (tmp_path / "run").exists()


def test_config_numbers_yaml_reads_as_text_still_work(f32_cache, photo_tars, tmp_path):
    from hgkd.distill.config import DistillConfig

    assert DistillConfig.from_dict({"lr": "8e-4", "data": "a.tar"}).lr == 8e-4  # YAML 1.1: 8e-4 is a string


def test_yaml_syntax_error_names_file_line_and_column(f32_cache, photo_tars, tmp_path):
    config, result = distill_with_config(tmp_path, "epochs: 2\nlr: [0.1\nseed: 3\n", f32_cache, photo_tars)
    assert_one_line_error(result, f"--config {config}: invalid YAML at line 3, column 5")
    assert not (tmp_path / "run").exists()


# Range checks (issue 21): a value outside what the option means is one line naming it, before any
# file is read or written - never a traceback, never a run that trains to NaN and exits 0.
def distill_with_options(tmp_path, f32_cache: str, photo_tars: str, *options: str):
    args = ["run", "--cache", f32_cache, "--data", photo_tars, "--out", str(tmp_path / "run"),
            "--student", "resnet18", "--sparse-backend", "masked", "--workers", "0", *options]
    return invoke(distill_cli, args)


@pytest.mark.parametrize("options,message", [
    (["--lr", "-1"], "--lr -1.0 must be greater than 0"),
    (["--lr", "1e12"], "--lr 1000000000000.0 must be at most 10"),
    (["--tau", "0"], "--tau 0.0 must be greater than 0"),
    (["--clip-grad", "-1"], "--clip-grad -1.0 must be greater than 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0 must be at least 0"),
    (["--queue-size", "0"], "--queue-size 0 must be at least 1"),
    (["--queue-size", "-5"], "--queue-size -5 must be at least 1"),
    (["--queue-size", str(2**40)], f"--queue-size {2**40} must be at most"),
    (["--decoder-width", "0"], "--decoder-width 0 must be at least 8"),
    (["--workers", "-1"], "--workers -1 must be at least 0"),
    (["--optimizer", "nosuchopt"], "--optimizer 'nosuchopt' is not a timm optimizer"),
    (["--optimizer", "lamm"], "--optimizer 'lamm' is not a timm optimizer (did you mean lamb"),
    (["--mask-ratio", "1"], "--mask-ratio 1.0 must be less than 1"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_distill_values_outside_their_range_are_one_line(f32_cache, photo_tars, tmp_path, options, message):
    result = distill_with_options(tmp_path, f32_cache, photo_tars, *options)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_online_teacher_image_size_is_checked_before_the_teacher_is_built(photo_tars, tmp_path):
    result = invoke(distill_cli, ["run", "--online-teacher", "mae_vit_tiny_patch16", "--data", photo_tars,
                                  "--out", str(tmp_path / "run"), "--img-size", "0"])
    assert_one_line_error(result, "--img-size 0 must be at least")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,message", [
    ("lr: -1\n", "lr: -1 must be greater than 0"),
    ("tau: 0\n", "tau: 0 must be greater than 0"),
    ("queue_size: 0\n", "queue_size: 0 must be at least 1"),
    ("clip_grad: -1.0\n", "clip_grad: -1.0 must be greater than 0"),
])
def test_config_file_values_outside_their_range_name_the_file(f32_cache, photo_tars, tmp_path, text, message):
    config, result = distill_with_config(tmp_path, text, f32_cache, photo_tars)
    assert_one_line_error(result, f"{config}: {message}")
    assert not (tmp_path / "run").exists()


def test_a_command_line_value_names_the_option_even_with_a_config_file(f32_cache, photo_tars, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 1\n")
    result = distill_with_options(tmp_path, f32_cache, photo_tars, "--config", str(config), "--tau", "-0.5")
    assert_one_line_error(result, "--tau -0.5 must be greater than 0")


@pytest.mark.parametrize("command,options,message", [
    ("knn", ["--k", "0"], "--k 0 must be at least 1"),
    ("knn", ["--temperature", "0"], "--temperature 0 must be greater than 0"),
    ("knn", ["--test-fraction", "1"], "--test-fraction 1 must be less than 1"),
    ("knn", ["--workers", "-1"], "--workers -1 must be at least 0"),
    ("knn", ["--img-size", "nan"], "--img-size 'nan' must be an integer"),
    ("linear", ["--lr", "inf"], "--lr inf must be at most 10"),
    ("detection", ["--momentum", "1"], "--momentum 1 must be less than 1"),
    ("detection", ["--batch-size", "0"], "--batch-size 0 must be at least 1"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_evaluate_values_outside_their_range_are_one_line(photo_tars, tmp_path, command, options, message):
    from hgkd.evaluate.cli import main as evaluate_cli

    out = tmp_path / "r.json"
    data = [] if command == "detection" else ["--train", photo_tars]
    result = invoke(evaluate_cli, [command, "--model", "scratch:resnet18", *data, "--out", str(out), *options])
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option,value,message", [
    ("--workers", "-1", "--workers -1 must be at least 0"),
    ("--mask-ratio", "1.5", "--mask-ratio 1.5 must be in [0, 1)"),
])
def test_extract_values_outside_their_range_are_one_line(photo_tars, tmp_path, option, value, message):
    result = invoke(extract_cli, [*extract_args(photo_tars, str(tmp_path / "c.zarr")), option, value])
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []
