"""Stage two end to end on a real cache written by hgkd-extract, tiny real students, CPU."""
from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from hgkd.distill.cli import main as distill_cli
from hgkd.distill.data import CacheViewDataset
from hgkd.devices import resolve_device
from hgkd.distill.students.backend_choice import MEASURED_ORDER, BackendChoice, choose_sparse_backend, minkowski_runs_on
from hgkd.storage.cache import FeatureCache



BACKEND = "masked"  # the ME backend is proven equal to it in test_students.py


def distill_args(cache: str, data: str, out: str, *extra: str, backend: str = BACKEND) -> list[str]:
    return ["run", "--cache", cache, "--data", data, "--out", out, "--student", "resnet18",
            "--sparse-backend", backend, "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1",
            "--queue-size", "16", "--decoder-width", "64", "--workers", "0", *extra]


def invoke(args: list[str]):
    return CliRunner().invoke(distill_cli, args, catch_exceptions=False)


def subprocess_cli(args: list[str], **kw):
    return subprocess.run([sys.executable, "-m", "hgkd.distill.cli", *args], capture_output=True, text=True, **kw)


def read_metrics(run: Path) -> dict[int, float]:
    """step -> loss; the last occurrence wins (steps redone after a crash are logged again)."""
    with (run / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_dataset_batches_are_the_teachers_views_and_tokens(f32_cache, photo_tars):
    ds = CacheViewDataset(f32_cache, [photo_tars])
    cache = FeatureCache.open(f32_cache)
    rows = [5, 0, 17]
    batch = ds[rows].ready()
    assert batch.rows.tolist() == [0, 5, 17]
    np.testing.assert_array_equal(batch.tokens.numpy(), cache.read([0, 5, 17], ["tokens"])["tokens"])
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (3, 3, 64, 64)
    assert batch.visible.shape == (3, 4, 4) and (batch.visible.sum((1, 2)) == 8).all()


@pytest.mark.parametrize("backend", ["minkowski", "masked", "rows"])
def test_distill_runs_logs_and_exports_a_dense_timm_resnet(f32_cache, photo_tars, tmp_path, backend):
    run = tmp_path / "run"
    result = invoke(distill_args(f32_cache, photo_tars, str(run), backend=backend))
    assert result.exit_code == 0, result.output
    losses = read_metrics(run)
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))  # 2 passes over 12 images, batch 8
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    out = tmp_path / "student.safetensors"
    assert invoke(["export", str(run), "--out", str(out)]).exit_code == 0
    dense = timm.create_model("resnet18", num_classes=0)
    dense.load_state_dict(load_file(out), strict=True)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    torch.testing.assert_close(dense.state_dict()["conv1.weight"], ckpt["model"]["encoder.body.conv1.weight"])


def test_default_backend_is_auto_printed_once_and_saved_resolved(f32_cache, photo_tars, tmp_path):
    """No --sparse-backend (issue 20): 'auto' resolves to the measured-fastest backend that runs
    on this device, says so once, and the run's config.yaml records the backend that ran."""
    run = tmp_path / "run"
    args = [a for a in distill_args(f32_cache, photo_tars, str(run), "--epochs", "1", "--warmup-epochs", "0")]
    i = args.index("--sparse-backend")
    del args[i : i + 2]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    device = resolve_device("auto")  # CUDA on a GPU machine (benchmarks/device_check.sh runs this test there)
    expected = choose_sparse_backend("auto", device).name
    assert expected in MEASURED_ORDER[device.type][:1] + ("masked", "rows")
    assert result.stderr.count("sparse backend:") == 1
    assert f"sparse backend: {expected} (auto: fastest measured on {device.type}" in result.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["sparse_backend"] == expected


def test_auto_skips_backends_that_cannot_run(monkeypatch):
    """The first backend of the device's measured order that runs here is taken; MinkowskiEngine
    counts only where it imports and supports the device; other devices get plain torch ops."""
    monkeypatch.setitem(MEASURED_ORDER, "cpu", ("minkowski", "rows"))
    choice = choose_sparse_backend("auto", torch.device("cpu"))
    assert choice.name == ("minkowski" if importlib.util.find_spec("MinkowskiEngine") else "rows")
    assert choose_sparse_backend("auto", torch.device("meta")).name == "masked"
    assert choose_sparse_backend("rows", torch.device("meta")) == BackendChoice("rows", "chosen with --sparse-backend")
    if importlib.util.find_spec("MinkowskiEngine"):
        import MinkowskiEngine as ME
        assert minkowski_runs_on(torch.device("cuda")) == ME.is_cuda_available()


@pytest.mark.parametrize("flag", ["--no-unet", "--no-sparse", "--no-similarity"])
def test_ablation_switches_train(f32_cache, photo_tars, tmp_path, flag):
    run = tmp_path / "run"
    result = invoke(distill_args(f32_cache, photo_tars, str(run), flag, "--epochs", "1", "--warmup-epochs", "0"))
    assert result.exit_code == 0, result.output
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and ("sim" not in rows[0]) == (flag == "--no-similarity")


def test_kill_9_then_resume_equals_uninterrupted(f32_cache, photo_tars, tmp_path):
    reference = tmp_path / "ref"
    args = lambda out, *x: distill_args(f32_cache, photo_tars, str(out), "--epochs", "4", "--batch-size", "4", *x)  # noqa: E731
    assert invoke(args(reference)).exit_code == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hgkd.distill.cli", *args(run, "--checkpoint-every", "1")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(run) if (run / "metrics.csv").exists() else {}) < 7:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 7 <= len(read_metrics(run)) < 12, "kill must land in epoch 3 or 4"
    result = invoke(args(run, "--checkpoint-every", "1", "--resume"))
    assert result.exit_code == 0, result.output
    ref_losses, got_losses = read_metrics(reference), read_metrics(run)
    assert sorted(got_losses) == sorted(ref_losses) == list(range(1, 13))
    for step, loss in ref_losses.items():
        assert got_losses[step] == pytest.approx(loss, abs=1e-6), step
    ref_w = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    got_w = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=0, atol=1e-6, msg=name)


def test_ddp_two_processes_gloo(f32_cache, photo_tars, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "hgkd.distill.cli", *distill_args(f32_cache, photo_tars, str(run), "--epochs", "1", "--batch-size", "4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = read_metrics(run)
    assert sorted(losses) == list(range(1, len(losses) + 1)) and len(losses) == 12 // 4  # 12 images, global batch 4 = 2 x 2


def test_bad_inputs_are_one_line_errors(f32_cache, photo_tars, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.png").write_bytes((Path(__file__).parent / "fixtures" / "hgkd_losses.json").read_bytes())
    result = subprocess_cli(distill_args(f32_cache, str(other), str(tmp_path / "r")))
    assert result.returncode == 2 and "not the data set the cache was made from" in result.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1, 2\n")
    result = subprocess_cli(["run", "--config", str(bad_yaml)])
    assert result.returncode == 2 and result.stderr.startswith("error: --config") and result.stderr.count("\n") == 1
    result = subprocess_cli(distill_args(f32_cache, photo_tars, str(tmp_path / "r2"), "--resume"))
    assert result.returncode == 2 and "no checkpoint there" in result.stderr


def test_new_run_over_an_existing_one_is_refused(f32_cache, photo_tars, tmp_path):
    run = tmp_path / "run"
    assert invoke(distill_args(f32_cache, photo_tars, str(run), "--epochs", "1", "--warmup-epochs", "0")).exit_code == 0
    before = (run / "metrics.csv").read_text()
    result = subprocess_cli(distill_args(f32_cache, photo_tars, str(run), "--epochs", "1", "--warmup-epochs", "0"))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (run / "metrics.csv").read_text() == before


def test_yaml_config_with_cli_override(f32_cache, photo_tars, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cache: {f32_cache}\ndata: ['{photo_tars}']\nstudent: resnet18\nsparse-backend: {BACKEND}\n"
                   "batch_size: 8\nepochs: 5\nwarmup_epochs: 0\nqueue_size: 16\ndecoder_width: 64\nworkers: 0\n")
    run = tmp_path / "run"
    assert invoke(["run", "--config", str(cfg), "--out", str(run), "--epochs", "1"]).exit_code == 0
    saved = (run / "config.yaml").read_text()
    assert "epochs: 1\n" in saved and "student: resnet18\n" in saved


def test_online_teacher_gives_the_cached_targets(f32_cache, photo_tars, tmp_path):
    """A live teacher on the same views yields what the cache holds; training runs without a cache."""
    from hgkd.distill.config import DistillConfig
    from hgkd.distill.targets import CachedTargets, OnlineTargets

    common = dict(data=[photo_tars], out=str(tmp_path / "r"), seed=0, img_size=64, mask_ratio=0.5)
    online = OnlineTargets(DistillConfig(**common, online_teacher="mae_vit_tiny_patch16"), torch.device("cpu"))
    cached = CachedTargets(DistillConfig(**common, cache=f32_cache), torch.device("cpu"))
    cache = FeatureCache.open(f32_cache)
    rows = [0, 2, 4]  # view 0 of samples 0..2: online mode draws view k = e in epoch e, same seed
    want = cached.dataset[rows].ready()
    got = online.complete(online.dataset[[s * online.row_views for s in range(3)]])  # epoch 0
    assert torch.equal(got.images, want.images) and torch.equal(got.visible, want.visible)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-5, rtol=0)
    assert cache.meta.view["views_per_image"] == 2
    run = tmp_path / "online"
    result = invoke(["run", "--online-teacher", "mae_vit_tiny_patch16", "--img-size", "64", "--mask-ratio", "0.5",
                     *distill_args(f32_cache, photo_tars, str(run), "--epochs", "1")[3:]])
    assert result.exit_code == 0, result.output
    assert len(read_metrics(run)) == 12 // 8


def test_fidelity_report_improves_with_training(f32_cache, photo_tars, tmp_path):
    from hgkd.distill.fidelity import fidelity

    short, longer = tmp_path / "short", tmp_path / "long"
    invoke(distill_args(f32_cache, photo_tars, str(short), "--epochs", "1", "--warmup-epochs", "0", "--lr", "3e-3"))
    invoke(distill_args(f32_cache, photo_tars, str(longer), "--epochs", "12", "--warmup-epochs", "0", "--lr", "3e-3"))
    a, b = fidelity(short, f32_cache, [photo_tars]), fidelity(longer, f32_cache, [photo_tars])
    assert a["views"] == b["views"] == 24 and a["tokens"] == b["tokens"] == 24 * 8  # MAE: visible tokens only
    assert b["relative_mse"] < a["relative_mse"] and b["token_cosine"] > a["token_cosine"]
    result = subprocess_cli(["fidelity", str(longer), "--cache", f32_cache, "--data", photo_tars])
    assert result.returncode == 0 and "token cosine" in result.stdout
