"""Supervised baselines end to end: classifier teacher training, ``--method`` runs on real
digit shards, exact resume, export, one-line errors, and the baselines pipeline file."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from hgkd.distill.checkpoint import LAST, load_checkpoint
from hgkd.distill.classifier import load_classifier
from hgkd.distill.cli import main as distill_cli
from hgkd.distill.config import DistillConfig
from hgkd.data.random_access import RandomAccessSource
from hgkd.distill.train import Trainer
from hgkd.data.sources import open_source
from hgkd.data.demo_data import write_digits_shards
from hgkd.pipelines.run import run_pipeline
from hgkd.pipelines.spec import spec_from_dict

IMG = 32
PIPELINE_FILE = Path(__file__).parents[1] / "pipelines" / "baselines_small.yaml"


def invoke(args: list[str]):
    return CliRunner().invoke(distill_cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, str]:
    return write_digits_shards(tmp_path_factory.mktemp("digits"), img_size=IMG, max_images=96, per_shard=32)


@pytest.fixture(scope="module")
def teacher_file(digits, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    result = invoke(["teacher", "--data", digits[0], "--out", out, "--arch", "mae_vit_tiny_patch16",
                     "--img-size", str(IMG), "--branches", "--epochs", "2", "--batch-size", "24", "--workers", "0",
                     "--test-data", digits[1]])
    assert result.exit_code == 0, result.output
    assert "held-out top-1" in result.output
    return out


def run_args(digits, teacher_file: str, out: Path, method: str, *extra: str) -> list[str]:
    return ["run", "--method", method, "--data", digits[0], "--teacher-classifier", teacher_file, "--out", str(out),
            "--student", "resnet18", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--workers", "0",
            *extra]


def test_labels_match_the_extractor(digits):
    source = open_source([digits[0]])
    expected = [s.label for s in source]
    assert RandomAccessSource(source).labels == expected
    assert sorted(set(expected)) == list(range(10))


def test_teacher_file_rebuilds_with_branches(teacher_file):
    net, extra = load_classifier(teacher_file)
    assert net.arch == "mae_vit_tiny_patch16" and net.num_classes == 10 and net.branches is not None
    out = net.forward_outputs(torch.randn(3, 3, IMG, IMG))
    assert out.logits.shape == (3, 10) and [b.shape for b in out.branch_logits] == [(3, 40)] * 4
    assert 0.0 <= extra["metrics"]["test_top1"] <= 100.0


@pytest.mark.parametrize("method,opts,terms", [
    ("kd", [], {"ce", "kd"}),
    ("hsakd", [], {"ce", "branch_kl", "logit_kl"}),
    ("icd", ["--method-opt", "kd_weight=1"], {"ce", "kd", "icd_con", "icd_inv"}),
    ("fitnet", [], {"ce", "fitnet"}),
])
def test_method_trains_and_exports_a_dense_timm_resnet(digits, teacher_file, tmp_path, method, opts, terms):
    run = tmp_path / "run"
    result = invoke(run_args(digits, teacher_file, run, method, *opts))
    assert result.exit_code == 0, result.output
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == open_source([digits[0]]).num_samples // 16 and terms <= set(rows[0]) and all(np.isfinite(float(r["loss"])) for r in rows)
    exported = tmp_path / "student.safetensors"
    assert invoke(["export", str(run), "--out", str(exported)]).exit_code == 0
    timm.create_model("resnet18", num_classes=0).load_state_dict(load_file(exported), strict=True)


def test_crd_resume_reproduces_the_uninterrupted_run(digits, teacher_file, tmp_path):
    """Bank, Z, RNG and view cycling are all in the checkpoint: stop mid-epoch, resume, equal weights."""
    def cfg(out: Path) -> DistillConfig:
        return DistillConfig(method="crd", method_opts={"negatives": 32}, data=[digits[0]], out=str(out),
                             teacher_classifier=teacher_file, student="resnet18", epochs=2, warmup_epochs=0,
                             batch_size=16, workers=0, checkpoint_every=1, log_every=0, device="cpu")
    Trainer(cfg(tmp_path / "a")).fit()
    Trainer(cfg(tmp_path / "b")).fit(stop_after_steps=4)
    Trainer(cfg(tmp_path / "b"), resume=True).fit()
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / LAST) for r in "ab")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(b["method"]["memory.bank_student"], a["method"]["memory.bank_student"])


def test_epochs_see_fresh_views(digits, teacher_file, tmp_path):
    trainer = Trainer(DistillConfig(method="vanilla", data=[digits[0]], out=str(tmp_path / "r"), epochs=3, warmup_epochs=0,
                                    teacher_classifier=teacher_file, student="resnet18", batch_size=16, workers=0))
    rows = []
    for epoch in range(2):
        trainer.sampler.set_epoch(epoch)
        rows.append(sorted(r for batch in trainer.sampler for r in batch))
    assert [r % 3 for r in rows[0]] == [0] * len(rows[0]) and [r % 3 for r in rows[1]] == [1] * len(rows[1])
    first = trainer.dataset[rows[0][:4]]
    second = trainer.dataset[rows[1][:4]]
    assert torch.equal(first.labels, second.labels) and not torch.equal(first.images, second.images)


@pytest.mark.parametrize("extra,message", [
    (["--method-opt", "negatives=5"], "--method-opt negatives: not an option of method kd"),
    (["--method-opt", "oops"], "--method-opt 'oops': expected key=value"),
])
def test_bad_method_options_are_one_line_errors(digits, teacher_file, tmp_path, extra, message):
    result = invoke(run_args(digits, teacher_file, tmp_path / "r", "kd", *extra))
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_baseline_without_teacher_or_labels_is_one_line_error(digits, teacher_file, photo_tars, tmp_path):
    args = run_args(digits, teacher_file, tmp_path / "r", "kd")
    no_teacher = [a for a in args if a not in ("--teacher-classifier", teacher_file)]
    result = invoke(no_teacher)
    assert result.exit_code == 2 and "--method kd needs --teacher-classifier" in result.output
    missing = invoke(run_args(digits, str(tmp_path / "nope.pt"), tmp_path / "r", "kd"))
    assert missing.exit_code == 2 and "no such file" in missing.output
    folder = tmp_path / "flat"
    folder.mkdir()
    for sample in open_source([digits[0]]):
        (folder / f"{sample.index:03d}.png").write_bytes(sample.data)  # no class folders: no labels
    unlabelled = invoke(["teacher", "--data", str(folder), "--out", str(tmp_path / "t.pt"), "--arch", "resnet18",
                         "--img-size", str(IMG)])
    assert unlabelled.exit_code == 2 and "have no class label" in unlabelled.output
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "r").exists()


def test_baselines_pipeline_file_runs_trimmed(tmp_path):
    """The shipped file, shrunk: MAE teacher -> cache + classifier teacher -> H-GKD and baselines."""
    blob = yaml.safe_load(PIPELINE_FILE.read_text())
    assert {v.get("method", "hgkd") for v in blob["variants"] if not v.get("scratch")} == {
        "hgkd", "vanilla", "kd", "icd", "hsakd", "dist", "crd", "rkd", "pkt", "fitnet", "at", "sp"}
    blob.update(out=str(tmp_path / "out"), builtin={"img_size": IMG, "max_images": 120, "per_shard": 64})
    blob["teacher"].update(img_size=IMG, pretrain_mae={"epochs": 1})
    blob["teacher"]["name"] = "mae_vit_tiny_patch16"
    blob["classifier_teacher"].update(epochs=1)
    blob["cache"].update(shard_views=64)
    blob["distill"].update(epochs=1, warmup_epochs=0, batch_size=30, workers=0, queue_size=64, decoder_width=32)
    blob["eval"].update(img_size=IMG, tasks=["knn"])
    blob["variants"] = [v for v in blob["variants"] if v["name"] in ("hgkd", "kd", "hsakd", "scratch")]
    spec = spec_from_dict(blob, source=str(PIPELINE_FILE))
    paths = run_pipeline(spec)
    with paths["csv"].open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["teacher", "hgkd", "kd", "hsakd", "scratch"]
    assert rows["teacher"]["classifier_top1"] and not rows["teacher"]["knn_top1"]
    assert rows["kd"]["classifier_top1"] and not rows["hgkd"]["classifier_top1"]
    assert all(0 <= float(rows[v]["knn_top1"]) <= 100 for v in ("hgkd", "kd", "hsakd", "scratch"))
    stamp = (tmp_path / "out" / "teacher" / "classifier.pt").stat().st_mtime_ns
    assert run_pipeline(spec_from_dict(blob, source="again"))["csv"].read_text() == paths["csv"].read_text()
    assert (tmp_path / "out" / "teacher" / "classifier.pt").stat().st_mtime_ns == stamp
