"""Preemption of the fine-tunes (issue 21, item 2): SIGTERM/SIGUSR1 to a real ``hgkd-evaluate
finetune`` process stops it after the current step with a checkpoint, one ``stopped:`` line and
exit code 75; the same command with ``--resume`` ends with the uninterrupted run's accuracy and
bit-equal weights (CPU). Detection training stops the same way (in-process trainer, a stop
requested after K iterations, and a real SIGTERM to a CLI process), and resumes to the
uninterrupted record."""
from __future__ import annotations

import importlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hgkd.data.demo_data import _jpeg
from hgkd.errors import RESUMABLE_EXIT
from hgkd.evaluate.cli import main as evaluate_cli

from cli_results import invoke  # noqa: F401 - used by test_detection.detect
from test_detection import ARCH, TINY, data_args, detect, digits  # noqa: F401 - digits: a fixture
from test_evaluate import photo_crops, write_tar

# pycocotools 2.0.x under numpy 2 warns in every mask decode (as in test_detection)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
finetune_module = importlib.import_module("hgkd.evaluate.finetune")  # the package exports the function under this name

# 6 classes x 6 crops at 32 px; 27 training images in batches of 8: 3 steps per epoch, 12 in all
FINETUNE = ["finetune", "--model", "scratch:resnet18", "--img-size", "32", "--batch-size", "8", "--epochs", "4",
            "--min-scale", "0.5", "--test-fraction", "0.25"]


@pytest.fixture(scope="module")
def small_tar(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ft-tar")
    samples = [{"__key__": k, "jpg": _jpeg(img), "cls": str(y)} for k, img, y in photo_crops(6, size=32)]
    return write_tar(out / "small.tar", samples)


@pytest.fixture(scope="module")
def uninterrupted(small_tar, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ft-ref") / "ref.json"
    result = CliRunner().invoke(evaluate_cli, [*FINETUNE, "--train", small_tar, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not (out.parent / "ref.ckpt" / "finetune.pt").exists()  # no stop, no checkpoint left
    return json.loads(out.read_text())


def _same_run(got: dict, want: dict) -> None:
    for key in ("weights_sha256", "top1", "top5", "final_loss", "train_top1"):
        assert got[key] == want[key], key


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGUSR1: the same handler (test_extract_preemption)
def test_signal_mid_run_then_resume_equals_uninterrupted(small_tar, uninterrupted, tmp_path, sig):
    out = tmp_path / "ft.json"
    args = [*FINETUNE, "--train", small_tar, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "hgkd.evaluate.cli", "-v", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline and (line := proc.stderr.readline()):  # -v: one log line per epoch
        lines.append(line)
        if "finetune epoch 1/4" in line:
            proc.send_signal(sig)  # during epoch 2: stops after its current step
            break
    stdout, rest = proc.communicate(timeout=120)
    assert proc.returncode == RESUMABLE_EXIT, "".join(lines) + rest[-3000:]
    stopped = [line for line in rest.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and rest.endswith(stopped[0] + "\n") and "Traceback" not in rest, rest[-3000:]
    ckpt = tmp_path / "ft.ckpt" / "finetune.pt"
    assert re.fullmatch(rf"stopped: {re.escape(str(ckpt))}: {sig.name} at step (\d+) of 12 \(epoch \d\); resumable: "
                        r"run the same command with --resume", stopped[0]), stopped[0]
    assert ckpt.is_file() and not out.exists() and stdout == ""

    refused = subprocess.run([sys.executable, "-m", "hgkd.evaluate.cli", *args], capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --resume to continue it" in refused.stderr  # never overwritten silently
    resumed = subprocess.run([sys.executable, "-m", "hgkd.evaluate.cli", *args, "--resume"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(json.loads(out.read_text()), uninterrupted)
    assert not ckpt.exists()  # consumed by the finished run


@pytest.mark.parametrize("stop_at_step", [4, 12])  # mid epoch 2 (step 1 of 3); after the very last step
def test_stop_at_a_given_step_resumes_bit_equal(small_tar, uninterrupted, tmp_path, monkeypatch, stop_at_step):
    """Deterministic placement: the stop flag answers yes after step K (in process)."""
    agreed, calls = finetune_module.stop_agreed, []

    def stop_after_k(stop, world, device):
        calls.append(1)
        if len(calls) == stop_at_step:
            stop.request("SIGTERM")
        return agreed(stop, world, device)

    monkeypatch.setattr(finetune_module, "stop_agreed", stop_after_k)
    out = tmp_path / "ft.json"
    args = [*FINETUNE, "--train", small_tar, "--out", str(out)]
    first = CliRunner().invoke(evaluate_cli, args)
    assert first.exit_code == RESUMABLE_EXIT and f"SIGTERM at step {stop_at_step} of 12" in first.output, first.output
    monkeypatch.undo()
    again = CliRunner().invoke(evaluate_cli, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    _same_run(json.loads(out.read_text()), uninterrupted)


# ------------------------------------------------------------------------------------------ detection

DET_EPOCHS = ["--epochs", "3"]  # 8 canvases in batches of 4: 2 iterations per epoch, 6 in all
detection_module = importlib.import_module("hgkd.evaluate.detection")


@pytest.fixture(scope="module")
def det_reference(digits, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("det-ref") / "det.json"
    result = detect(digits, out, *DET_EPOCHS)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def _same_detection(got: dict, want: dict) -> None:
    assert got["final_loss"] == want["final_loss"] and got["iterations"] == want["iterations"]
    for iou_type in ("bbox", "segm"):
        assert got[iou_type] == want[iou_type]
        assert Path(got["detections"][iou_type]).read_text() == Path(want["detections"][iou_type]).read_text()


def test_detection_sigterm_mid_epoch_then_resume_equals_uninterrupted(digits, det_reference, tmp_path):
    out = tmp_path / "det.json"
    cmd = [sys.executable, "-m", "hgkd.evaluate.cli", "-v", "detection", "--model", f"scratch:{ARCH}",
           *data_args(digits), *TINY, *DET_EPOCHS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline and (line := proc.stderr.readline()):
        lines.append(line)
        if "detection epoch 1/3" in line:  # iteration 2 done (and its epoch-end checkpoint written)
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == RESUMABLE_EXIT, "".join(lines) + rest[-3000:]
    ckpt = tmp_path / "det.ckpt" / "detection.pt"
    stopped = [line for line in rest.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and rest.endswith(stopped[0] + "\n") and "Traceback" not in rest, rest[-3000:]
    found = re.fullmatch(rf"stopped: {re.escape(str(ckpt))}: SIGTERM at iteration (\d) of 6; resumable: run the same "
                         r"command with --resume", stopped[0])
    assert found and 3 <= int(found.group(1)) < 6, stopped[0]
    assert torch.load(ckpt, weights_only=True)["iteration"] == int(found.group(1)) and not out.exists()
    result = detect(digits, out, *DET_EPOCHS, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    _same_detection(json.loads(out.read_text()), det_reference)


def test_detection_stop_requested_after_k_iterations_resumes_exactly(digits, det_reference, tmp_path, monkeypatch):
    """In process: the trainer's stop flag set after iteration 3 (mid epoch 2, no periodic checkpoint)."""
    agreed, calls = detection_module.stop_agreed, []

    def stop_after_3(stop, world, device):
        calls.append(1)
        if len(calls) == 3:
            stop.request()
        return agreed(stop, world, device)

    monkeypatch.setattr(detection_module, "stop_agreed", stop_after_3)
    out = tmp_path / "det.json"
    first = detect(digits, out, *DET_EPOCHS)
    assert first.returncode == RESUMABLE_EXIT and first.stderr.count("\n") == 1, first.stderr[-3000:]
    assert first.stderr == (f"stopped: {tmp_path / 'det.ckpt' / 'detection.pt'}: request at iteration 3 of 6; "
                            "resumable: run the same command with --resume\n")
    monkeypatch.undo()
    result = detect(digits, out, *DET_EPOCHS, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    _same_detection(json.loads(out.read_text()), det_reference)
