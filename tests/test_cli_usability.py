"""What a newcomer meets first: fast --help that lists the names, README commands that parse,
a default warm-up that fits short runs, and --data as a folder of tar shards."""
from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hgkd import registry
from hgkd.distill.cli import main as distill_cli
from hgkd.distill.config import DistillConfig
from hgkd.errors import HgkdError
from hgkd.evaluate.cli import main as evaluate_cli
from hgkd.extract.cli import main as extract_cli
from hgkd.data.sources import open_source
from hgkd.pipelines.cli import main as pipeline_cli
from hgkd.storage.codecs import COMPRESSORS, TOKEN_CODECS

from conftest import extract_args

README = Path(__file__).resolve().parents[1] / "README.md"
SCRIPTS = {"hgkd-extract": extract_cli, "hgkd-distill": distill_cli, "hgkd-evaluate": evaluate_cli,
           "hgkd-pipeline": pipeline_cli}
HEAVY = ("torch", "timm", "zarr", "MinkowskiEngine", "webdataset")

# Imports one CLI module, renders every --help in-process, reports which heavy modules got imported.
HELP_PROBE = """
import importlib, json, sys
from click.testing import CliRunner
heavy = lambda: sorted(m for m in sys.argv[2:] if m in sys.modules)
main = importlib.import_module(sys.argv[1]).main
after_import = heavy()
helps = {sub: CliRunner().invoke(main, [*([sub] if sub else []), "--help"]) for sub in ["", *main.commands]}
print(json.dumps({"after_import": after_import, "after_help": heavy(),
                  "helps": {sub: [r.exit_code, r.output] for sub, r in helps.items()}}))
"""


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("module", [f"hgkd.{room}.cli" for room in ("extract", "distill", "evaluate", "pipelines")])
def test_help_imports_no_torch_timm_or_zarr(module):
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, module, *HEAVY], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after_import"] == [] and report["after_help"] == [], report
    assert all(code == 0 and "Usage:" in out for code, out in report["helps"].values()), report["helps"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help_runs(script):
    exe = Path(sys.executable).parent / script
    assert exe.is_file(), f"{exe}: console script not installed"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr
    assert all(sub in result.stdout for sub in SCRIPTS[script].commands)


def test_declared_names_equal_the_real_registries():
    from hgkd.distill.methods import METHODS
    from hgkd.distill.students import STUDENT_ENCODERS
    from hgkd.evaluate.probe import HEADS
    from hgkd.extract.teachers import TEACHERS

    assert list(registry.TEACHER_NAMES) == TEACHERS.names()
    assert list(registry.STUDENT_NAMES) == STUDENT_ENCODERS.names()
    assert list(registry.METHOD_NAMES) == METHODS.names()
    assert registry.DEFAULT_METHOD in METHODS
    assert registry.PROBE_HEAD_NAMES == HEADS


def test_codec_choices_are_the_codec_registry():
    """Codec names come from their torch-free home, the codec registry itself (no copy)."""
    from hgkd.storage.codecs import CODECS, COMPRESSORS

    options = {p.name: p for p in extract_cli.commands["run"].params}
    assert list(options["codec"].type.choices) == list(CODECS)
    assert list(options["compressor"].type.choices) == list(COMPRESSORS)


@pytest.mark.parametrize("cli, sub, configs", [
    (distill_cli, "run", ("hgkd.distill.config:DistillConfig",)),
    (distill_cli, "teacher", ("hgkd.distill.config:TeacherConfig",)),
    (extract_cli, "run", ("hgkd.extract.config:ExtractConfig", "hgkd.data.view_config:ViewConfig",
                          "hgkd.storage.codecs:CodecSpec")),
])
def test_option_defaults_are_the_config_defaults(cli, sub, configs):
    """Every option named like a config field defaults to that field's default (one home, issue 14)."""
    import dataclasses
    import importlib

    options = {p.name: p for p in cli.commands[sub].params if isinstance(p, click.Option)}
    checked = []
    for spec in configs:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        for field in dataclasses.fields(cls):
            option = options.get(field.name)
            if option is None or field.default is dataclasses.MISSING:  # not an option, or a list/dict factory
                continue
            if option.default is None or type(option.default).__name__ == "Sentinel":  # none stated (click's UNSET)
                continue
            got, want = option.default, field.default
            if isinstance(option.type, click.Choice):  # choices are strings on the command line
                got, want = str(got), str(want)
            assert got == want, f"{sub} --{field.name.replace('_', '-')}: default {got!r}, {name}.{field.name} = {want!r}"
            checked.append(field.name)
    assert len(checked) >= 10, checked  # the options and fields really were paired


def help_of(cli: click.Group, sub: str) -> str:
    result = CliRunner().invoke(cli, [sub, "--help"])
    assert result.exit_code == 0, result.output
    return flat(result.output)


def test_help_lists_teachers_students_methods_and_codecs():
    teachers, students = ", ".join(registry.TEACHER_NAMES), ", ".join(registry.STUDENT_NAMES)
    extract_run = help_of(extract_cli, "run")
    assert teachers in extract_run and "|".join(TOKEN_CODECS) in extract_run and "|".join(COMPRESSORS) in extract_run
    assert teachers in help_of(extract_cli, "demo")
    distill_run = help_of(distill_cli, "run")
    assert "|".join(registry.METHOD_NAMES) in distill_run and "|".join(registry.STUDENT_NAMES) in distill_run
    assert teachers in distill_run  # --online-teacher
    distill_teacher = help_of(distill_cli, "teacher")
    assert teachers in distill_teacher and students in distill_teacher
    assert "|".join(registry.PROBE_HEAD_NAMES) in help_of(evaluate_cli, "linear")


def readme_commands() -> list[tuple[str, str, str]]:
    """``(script, subcommand, rest)`` of every hgkd command line in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"(?:\.venv/bin/(hgkd-\w+)|-m hgkd\.(\w+)\.cli) +(\w+)(.*)", line.split("  #")[0])
            if found:
                module_script = {"extract": "hgkd-extract", "distill": "hgkd-distill"}.get(found[2] or "")
                commands.append((found[1] or module_script, found[3], found[4].strip()))
    return commands


def test_readme_finds_every_script():
    assert {script for script, _, _ in readme_commands()} == set(SCRIPTS)


@pytest.mark.parametrize("script, sub, rest", readme_commands(),
                         ids=[f"{i}-{script}-{sub}" for i, (script, sub, _) in enumerate(readme_commands())])
def test_readme_command_matches_its_help(script, sub, rest):
    """Every --option exists, every [--opt a|b] value is a choice; a complete line (no '...')
    parses, required options and choices included."""
    command = SCRIPTS[script].commands.get(sub)
    assert command is not None, f"README: {script} has no subcommand {sub!r}"
    params = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    unknown = sorted(set(re.findall(r"--[a-z][a-z0-9-]*", rest)) - set(params))
    assert not unknown, f"README: {script} {sub} has no option {unknown}"
    for opt, values in re.findall(r"\[(--[a-z0-9-]+) ([^\]\s]+)\]", rest):
        if isinstance(params[opt].type, click.Choice):
            assert set(values.split("|")) <= set(params[opt].type.choices), f"README: {opt} {values}"
    if "..." not in rest:
        args = shlex.split(re.sub(r"\[[^\]]*\]", " ", rest))  # drop the optional [--opt VALUE] groups
        command.make_context(f"{script} {sub}", args)  # raises click.UsageError on anything missing or wrong


def test_default_warmup_scales_to_short_runs_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hgkd.distill.config"):
        assert DistillConfig().warmup_epochs == 40 and DistillConfig(epochs=40).warmup_epochs == 40
        assert not caplog.records
        assert DistillConfig(epochs=10).warmup_epochs == 4 and DistillConfig(epochs=1).warmup_epochs == 0
    assert len(caplog.records) == 2 and "the default 40 exceeds --epochs 10, using 4" in caplog.records[0].message
    with pytest.raises(HgkdError, match="--warmup-epochs 40 must be between 0 and --epochs 1"):
        DistillConfig(epochs=1, warmup_epochs=40)


def small_run(cache: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--cache", cache, "--data", data, "--out", str(out), "--student", "resnet18",
            "--sparse-backend", "masked", "--batch-size", "8", "--queue-size", "16", "--decoder-width", "32",
            "--workers", "0", *extra]


def test_distill_epochs_1_runs_with_the_default_recipe(f32_cache, photo_tars, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hgkd.distill.config"):
        result = CliRunner().invoke(distill_cli, small_run(f32_cache, photo_tars, run, "--epochs", "1"))
    assert result.exit_code == 0, result.output
    assert "using 0 (the paper's 40/100)" in caplog.text
    assert "warmup_epochs: 0\n" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("where", ["cli", "config"])
def test_explicit_warmup_beyond_epochs_is_one_line(f32_cache, photo_tars, tmp_path, where):
    run = tmp_path / "run"
    extra = ["--epochs", "1", "--warmup-epochs", "5"]
    if where == "config":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("epochs: 1\nwarmup_epochs: 5\n")
        extra = ["--config", str(recipe)]
    result = CliRunner().invoke(distill_cli, small_run(f32_cache, photo_tars, run, *extra), catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr == "error: --warmup-epochs 5 must be between 0 and --epochs 1\n"
    assert not run.exists()


def test_folder_of_tar_shards_reads_as_shards(photo_tars):
    folder = str(Path(photo_tars).parent)
    by_folder, by_pattern = open_source([folder]), open_source([photo_tars])
    assert by_folder.kind == "webdataset" and by_folder.num_samples == by_pattern.num_samples == 12
    assert by_folder.fingerprint() == by_pattern.fingerprint()  # a cache made from one is distilled with the other
    assert [s.key for s in by_folder] == [s.key for s in by_pattern]


def test_folder_without_images_or_tars_suggests_a_brace_pattern(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    result = CliRunner().invoke(extract_cli, extract_args(str(tmp_path), str(tmp_path / "c.zarr")), catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "no .tar shards" in result.stderr and "'shards/train-{0000..0009}.tar'" in result.stderr
    assert not (tmp_path / "c.zarr").exists()
