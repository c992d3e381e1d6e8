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
