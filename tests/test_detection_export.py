"""``hgkd-distill export --format timm|torchvision|detectron2`` (issue 19, item 3): a run directory's
student as the files the detection toolboxes read, names held against detectron2's own table."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import load_file

from hgkd.distill.checkpoint import save_checkpoint
from hgkd.distill.cli import EXPORT_FORMATS
from hgkd.distill.cli import main as distill_cli
from hgkd.distill.config import DistillConfig
from hgkd.distill.students import create_encoder
from hgkd.distill.students.export import FORMATS, detectron2_name
from hgkd.evaluate.trunks import load_trunk

# detectron2's ResNet parameter names (detectron2/modeling/backbone/resnet.py: BasicStem ``stem.conv1``
# with ``.norm``; stage ``res{2..5}.{block}``; ``conv1..3`` each with ``.norm``; ``shortcut`` with ``.norm``),
# as MoCo's convert-pretrain-to-detectron2.py writes them: ResNet-50's first block and a few more.
DETECTRON2_R50 = {
    "conv1.weight": "stem.conv1.weight",
    "bn1.weight": "stem.conv1.norm.weight",
    "bn1.running_var": "stem.conv1.norm.running_var",
    "layer1.0.conv1.weight": "res2.0.conv1.weight",
    "layer1.0.bn1.bias": "res2.0.conv1.norm.bias",
    "layer1.0.conv3.weight": "res2.0.conv3.weight",
    "layer1.0.bn3.running_mean": "res2.0.conv3.norm.running_mean",
    "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
    "layer1.0.downsample.1.weight": "res2.0.shortcut.norm.weight",
    "layer2.3.bn2.weight": "res3.3.conv2.norm.weight",
    "layer3.5.conv2.weight": "res4.5.conv2.weight",
    "layer4.0.downsample.1.running_var": "res5.0.shortcut.norm.running_var",
    "layer4.2.bn3.bias": "res5.2.conv3.norm.bias",
}
BLOCK = ("conv1.weight", "conv1.norm.weight", "conv1.norm.bias", "conv1.norm.running_mean", "conv1.norm.running_var",
         "conv2.weight", "conv2.norm.weight", "conv2.norm.bias", "conv2.norm.running_mean", "conv2.norm.running_var")
SHORTCUT = ("shortcut.weight", "shortcut.norm.weight", "shortcut.norm.bias", "shortcut.norm.running_mean",
            "shortcut.norm.running_var")


def detectron2_r18_names() -> set[str]:
    """Every parameter/buffer of detectron2's R-18 (BasicBlock, 2 per stage, shortcut from res3 on)."""
    names = {f"stem.conv1.{s}" for s in ("weight", "norm.weight", "norm.bias", "norm.running_mean",
                                         "norm.running_var")}
    for stage in (2, 3, 4, 5):
        for block in (0, 1):
            names |= {f"res{stage}.{block}.{n}" for n in BLOCK}
        if stage > 2:
            names |= {f"res{stage}.0.{n}" for n in SHORTCUT}
    return names


def test_declared_formats_are_the_exporters():
    assert EXPORT_FORMATS == FORMATS


@pytest.mark.parametrize("timm_name, d2_name", sorted(DETECTRON2_R50.items()))
def test_detectron2_names_follow_its_table(timm_name, d2_name):
    assert detectron2_name(timm_name) == d2_name


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A distillation run directory holding a (random) ResNet-18 student, as ``hgkd-distill run`` leaves it."""
    run = tmp_path_factory.mktemp("run")
    encoder = create_encoder("resnet18", backend="masked")
    cfg = DistillConfig(student="resnet18", data=["d.tar"], out=str(run))
    save_checkpoint(run, {"model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                          "config": cfg.to_dict()})
    return run


def export(run_dir: Path, out: Path, fmt: str) -> None:
    result = CliRunner().invoke(distill_cli, ["export", str(run_dir), "--out", str(out), "--format", fmt])
    assert result.exit_code == 0, result.output
    assert f"{fmt} 'resnet18' weights" in result.output


def test_every_format_holds_the_same_weights(run_dir, tmp_path):
    export(run_dir, tmp_path / "s.safetensors", "timm")
    timm_state = load_file(str(tmp_path / "s.safetensors"))
    assert load_trunk(str(tmp_path / "s.safetensors")).state_dict().keys() == timm_state.keys()

    export(run_dir, tmp_path / "s.pth", "torchvision")
    tv_state = torch.load(tmp_path / "s.pth", weights_only=True)
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(tv_state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in timm_state.items())

    export(run_dir, tmp_path / "s.pkl", "detectron2")
    with open(tmp_path / "s.pkl", "rb") as f:
        blob = pickle.load(f)
    assert blob["matching_heuristics"] is True and blob["__author__"].startswith("hgkd")
    assert set(blob["model"]) == detectron2_r18_names()
    for key, value in timm_state.items():
        if not key.endswith("num_batches_tracked"):
            assert (blob["model"][detectron2_name(key)] == value.numpy()).all(), key
