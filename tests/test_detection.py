"""``hgkd-evaluate detection`` (issue 19): real torchvision detectors at tiny sizes, real pycocotools,
real files. The embedded digit set, strict trunk loading, both normalisations, a training step,
scoring that re-scores equal with pycocotools, exact resume, and one-line errors for bad input."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d

from hgkd.data.digit_detection import write_digit_detection
from hgkd.errors import HgkdError
from hgkd.evaluate.cli import main as evaluate_cli
from hgkd.evaluate.coco_data import load_coco
from hgkd.evaluate.coco_eval import score, to_results
from hgkd.evaluate.detection_recipe import RECIPE_OPTIONS, DetectionRecipe
from hgkd.evaluate.detector import FROZEN_AT, build_detector, check_trunk_used, sync_batchnorm
from hgkd.evaluate.registry import TASKS
from hgkd.evaluate.trunks import load_trunk

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from cli_results import assert_one_line_error, invoke  # noqa: E402

# pycocotools 2.0.x under numpy 2 warns in every mask decode (its RLE objects' __array__ lacks ``copy``)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

ARCH = "test_resnet"  # timm's tiny ResNet: four stages, 32-192 channels
TINY = ["--batch-size", "4", "--epochs", "1", "--lr", "0.02", "--warmup-iters", "2", "--lr-steps", "1",
        "--train-sizes", "64", "--test-size", "64", "--width", "16", "--rois-per-image", "16", "--proposals", "50,20",
        "--detections-per-image", "10", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """8 training and 4 val canvases of 64 px from the embedded set's generator."""
    return write_digit_detection(tmp_path_factory.mktemp("digit-det"), n_train=8, n_val=4, canvas=64, scale=(16, 30))


def data_args(digits: dict) -> list[str]:
    (train, train_images), (val, val_images) = digits["train"], digits["val"]
    return ["--train", train, "--train-images", train_images, "--test", val, "--test-images", val_images]


def detect(digits: dict, out: Path, *extra: str, model: str = f"scratch:{ARCH}"):
    return invoke(evaluate_cli, ["detection", "--model", model, *data_args(digits), *TINY, "--out", str(out), *extra])


def test_embedded_set_is_coco_made_deterministically(digits, tmp_path):
    again = write_digit_detection(tmp_path, n_train=8, n_val=4, canvas=64, scale=(16, 30))
    for split in ("train", "val"):
        assert Path(again[split][0]).read_bytes() == Path(digits[split][0]).read_bytes()
        blob = json.loads(Path(digits[split][0]).read_text())
        assert [c["id"] for c in blob["categories"]] == list(range(1, 11))
        per_image = np.bincount([a["image_id"] for a in blob["annotations"]])[1:]
        assert len(per_image) == len(blob["images"]) and per_image.min() >= 1 and per_image.mean() >= 2  # several
        for ann in blob["annotations"]:  # box and area are the instance's own ink
            mask = mask_utils.decode(ann["segmentation"])
            assert mask.shape == (64, 64) and int(mask.sum()) == ann["area"] > 0
            assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]
    mtime = Path(digits["train"][0]).stat().st_mtime_ns
    assert write_digit_detection(Path(digits["train"][0]).parent, n_train=8, n_val=4, canvas=64, scale=(16, 30))
    assert Path(digits["train"][0]).stat().st_mtime_ns == mtime  # reused, not rewritten


def test_task_is_registered_with_its_options():
    task = TASKS.get("detection")
    assert task.inputs == "detection" and task.function().__name__ == "detection_task"
    assert RECIPE_OPTIONS <= task.options
    assert {"train", "train_images", "test", "test_images", "batch_size", "resume"} <= task.options


def test_recipe_defaults_are_the_1x_schedule():
    r = DetectionRecipe()
    assert (r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay, r.warmup_iters) == (12, 16, 0.02, 0.9, 1e-4, 1000)
    assert r.lr_steps == (8, 11) and r.train_sizes == (640, 672, 704, 736, 768, 800) and r.test_size == 800
    assert r.max_size == 1333 and r.flip == 0.5 and r.norm == "syncbn"
    assert r.scaled_lr(64) == pytest.approx(0.08)
    per_epoch = 7330  # COCO train2017 at 16 images a step
    assert r.lr_at(0, per_epoch, 16) == pytest.approx(0.02 * 0.001)
    assert r.lr_at(1000, per_epoch, 16) == pytest.approx(0.02)
    assert r.lr_at(8 * per_epoch, per_epoch, 16) == pytest.approx(0.002)
    assert r.lr_at(11 * per_epoch, per_epoch, 16) == pytest.approx(0.0002)


def _trunk_and_state(spec: str) -> tuple[nn.Module, dict]:
    trunk = load_trunk(spec)
    return trunk, {k: v.clone() for k, v in trunk.state_dict().items()}


@pytest.mark.parametrize("norm", ["syncbn", "frozen"])
def test_every_trunk_weight_lands_in_the_backbone(norm):
    trunk, state = _trunk_and_state("scratch:resnet18")
    model = build_detector(trunk, 10, norm=norm, detector="maskrcnn")
    check_trunk_used(state, model, "scratch:resnet18")
    body = model.backbone.body.state_dict()
    assert {k for k in state if not k.endswith("num_batches_tracked")} <= set(body)
    with torch.no_grad():
        model.backbone.body.layer4[1].conv2.weight.add_(1.0)  # a trunk weight not carried over
    with pytest.raises(HgkdError, match=r"not all used .*layer4.1.conv2.weight"):
        check_trunk_used(state, model, "scratch:resnet18")


def test_frozen_norm_is_detectron2s_and_syncbn_trains_bn_everywhere():
    frozen = build_detector(load_trunk(f"scratch:{ARCH}"), 3, norm="frozen", width=16)
    trunk_norms = [m for m in frozen.backbone.body.modules() if "Norm" in type(m).__name__]
    assert trunk_norms and all(isinstance(m, FrozenBatchNorm2d) for m in trunk_norms)
    for name, param in frozen.backbone.body.named_parameters():
        assert param.requires_grad == (not name.startswith(tuple(f"{m}." for m in FROZEN_AT))), name
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())  # FPN and heads without norm
    assert isinstance(frozen.roi_heads.box_head, TwoMLPHead)

    sync = build_detector(load_trunk(f"scratch:{ARCH}"), 3, norm="syncbn", width=16)
    assert all(p.requires_grad for p in sync.parameters())  # nothing frozen
    assert isinstance(sync.roi_heads.box_head, FastRCNNConvFCHead)
    for part in (sync.backbone.body, sync.backbone.fpn, sync.roi_heads.box_head, sync.roi_heads.mask_head):
        assert any(isinstance(m, nn.BatchNorm2d) for m in part.modules()), type(part).__name__
    converted = sync_batchnorm(copy.deepcopy(sync), world=2, device=torch.device("cuda"))  # DDP on CUDA
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in sync.modules())
    assert sync_batchnorm(sync, world=2, device=torch.device("cpu")) is sync  # no CPU kernels: per-rank BN


def test_supervised_reference_loads_strictly_from_a_torchvision_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18()  # the layout of resnet18-f37072fd.pth
    file = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), file)
    trunk = load_trunk(f"supervised:resnet18:{file}")
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(trunk.state_dict()[key], value), key
    extra = {**reference.state_dict(), "layer5.weight": torch.zeros(1)}
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(HgkdError, match=r"weights do not fit timm resnet18 \(Unexpected key.*layer5"):
        load_trunk(f"supervised:resnet18:{tmp_path / 'extra.pth'}")
    missing = {k: v for k, v in reference.state_dict().items() if k != "layer1.0.conv1.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(HgkdError, match=r"Missing key.*layer1.0.conv1.weight"):
        load_trunk(f"supervised:resnet18:{tmp_path / 'missing.pth'}")


def test_ground_truth_as_detections_scores_100_with_non_contiguous_categories(digits, tmp_path):
    blob = json.loads(Path(digits["val"][0]).read_text())
    remap = {c["id"]: 10 * c["id"] + 3 for c in blob["categories"]}  # COCO's ids have gaps (1..90)
    for c in blob["categories"]:
        c["id"] = remap[c["id"]]
    for a in blob["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    (tmp_path / "val.json").write_text(json.dumps(blob))
    data = load_coco(str(tmp_path / "val.json"), digits["val"][1], masks=True, option="--test")
    outputs = []
    for img in blob["images"]:
        anns = [a for a in blob["annotations"] if a["image_id"] == img["id"]]
        x, y, w, h = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).unbind(1)
        masks = torch.stack([torch.from_numpy(mask_utils.decode(a["segmentation"])) for a in anns]).float()
        outputs.append({"boxes": torch.stack([x, y, x + w, y + h], 1), "scores": torch.ones(len(anns)),
                        "labels": torch.tensor([data.category_ids.index(a["category_id"]) + 1 for a in anns]),
                        "masks": masks[:, None]})
    results = to_results(outputs, [img["id"] for img in blob["images"]], data.category_ids, masks=True)
    gt = data.coco()
    for iou_type in ("bbox", "segm"):
        found = score(gt, results[iou_type], iou_type)
        assert found["AP"] == pytest.approx(100.0) and found["AP50"] == pytest.approx(100.0), (iou_type, found)
    assert score(gt, [], "bbox")["AP"] == 0.0


def rescore(gt_file: str, results_file: str, iou_type: str) -> list[float]:
    """pycocotools on the written files, as anyone would re-score them."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        evaluator = COCOeval(gt, gt.loadRes(results_file), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [100.0 * v if v >= 0 else None for v in evaluator.stats[:6]]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> tuple[Path, dict, str]:
    """One CLI run: 2 epochs x 2 steps of 4 canvases, a checkpoint every step."""
    out = tmp_path_factory.mktemp("det-run") / "det.json"
    result = detect(digits, out, "--epochs", "2", "--checkpoint-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(out.read_text()), result.stdout


def test_cli_trains_scores_and_writes_coco_results_that_rescore_equal(trained, digits):
    out, record, stdout = trained
    assert (record["task"], record["detector"], record["norm"], record["recipe_name"]) == \
        ("detection", "maskrcnn", "syncbn", "1x")
    assert (record["n_train"], record["n_test"], record["n_classes"], record["iterations"]) == (8, 4, 10, 4)
    assert np.isfinite(record["final_loss"]) and record["train_images_per_s"] > 0
    assert set(record["detections"]) == {"bbox", "segm"} and record["n_detections"] > 0
    for iou_type, metrics in (("bbox", "AP AP50 AP75 APs APm APl"), ("segm", "AP AP50 AP75 APs APm APl")):
        assert list(record[iou_type]) == metrics.split()
        written = record["detections"][iou_type]
        assert Path(written).parent == out.parent and Path(written).name == f"det.{iou_type}.json"
        first = json.loads(Path(written).read_text())[0]
        assert set(first) == {"image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation"}
        assert rescore(digits["val"][0], written, iou_type) == list(record[iou_type].values())
    assert "bbox" in stdout and "segm" in stdout and "AP50" in stdout and str(out) in stdout  # the AP table


def test_resume_after_a_kill_mid_epoch_equals_the_uninterrupted_run(trained, digits, tmp_path):
    reference_out, reference, _ = trained
    out = tmp_path / "det.json"
    ckpt = tmp_path / "det.ckpt" / "detection.pt"
    cmd = [sys.executable, "-m", "hgkd.evaluate.cli", "detection", "--model", f"scratch:{ARCH}", *data_args(digits),
           *TINY, "--epochs", "2", "--checkpoint-every", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 1 <= stopped_at < 4 and not out.exists()
    result = detect(digits, out, "--epochs", "2", "--checkpoint-every", "1", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["final_loss"] == reference["final_loss"]
    for iou_type in ("bbox", "segm"):
        assert record[iou_type] == reference[iou_type]
        assert Path(record["detections"][iou_type]).read_text() == \
            Path(reference["detections"][iou_type]).read_text()


def test_more_epochs_continue_a_finished_run_and_other_settings_are_refused(digits, tmp_path):
    out = tmp_path / "det.json"
    args = ["--detector", "fasterrcnn", "--norm", "frozen"]
    first = detect(digits, out, *args, "--progress")
    assert first.returncode == 0 and "loss=" in first.stderr and "img_s=" in first.stderr  # the progress bar
    assert_one_line_error(detect(digits, out, *args), f"{out.parent / 'det.ckpt' / 'detection.pt'} holds a "
                                                      "detection checkpoint: pass --resume")
    assert_one_line_error(detect(digits, out, *args, "--lr", "0.01", "--resume"),
                          f"--resume {out.parent / 'det.ckpt' / 'detection.pt'}: made with other settings (lr: 0.02")
    assert detect(digits, out, *args, "--epochs", "2", "--resume").returncode == 0
    two = tmp_path / "two" / "det.json"
    assert detect(digits, two, *args, "--epochs", "2").returncode == 0
    assert json.loads(out.read_text())["bbox"] == json.loads(two.read_text())["bbox"]
    assert "segm" not in json.loads(two.read_text())  # Faster R-CNN: boxes only


def _write(path: Path, blob) -> str:
    path.write_text(blob if isinstance(blob, str) else json.dumps(blob))
    return str(path)


def _broken(digits: dict, tmp_path: Path, change) -> str:
    blob = json.loads(Path(digits["train"][0]).read_text())
    change(blob)
    return _write(tmp_path / "broken.json", blob)


def _all_crowd(blob: dict) -> None:
    for ann in blob["annotations"]:
        ann["iscrowd"] = 1


@pytest.mark.parametrize("case, change, message", [
    ("unknown image", lambda b: b["annotations"][0].update(image_id=999),
     "annotation 1 names image 999, which is not in 'images'"),
    ("unknown category", lambda b: b["annotations"][0].update(category_id=77),
     "annotation 1 names category 77, which is not in 'categories'"),
    ("polygon of 2 points", lambda b: b["annotations"][0].update(segmentation=[[1, 1, 5, 5]]),
     "annotation 1: invalid polygon"),
    ("RLE of another size", lambda b: b["annotations"][0]["segmentation"].update(size=[10, 10]),
     "annotation 1: RLE size [10, 10] is not the image's [height, width] [64, 64]"),
    ("bad box", lambda b: b["annotations"][0].update(bbox=[1, 2, 3]), "annotation 1: 'bbox' must be [x, y, width"),
    ("no training annotations", _all_crowd, "no training annotations (every instance is a crowd"),
])
def test_bad_annotations_are_one_line(digits, tmp_path, case, change, message):
    broken = _broken(digits, tmp_path, change)
    result = invoke(evaluate_cli, ["detection", "--model", f"scratch:{ARCH}", "--train", broken, "--train-images",
                                   digits["train"][1], "--test", digits["val"][0], "--test-images", digits["val"][1],
                                   *TINY, "--out", str(tmp_path / "o.json")])
    assert_one_line_error(result, f"--train {broken}: {message}" if "annotation" in message or "training" in message
                          else message)
    assert not (tmp_path / "o.json").exists()


def test_bad_files_and_models_are_one_line(digits, tmp_path):
    out = str(tmp_path / "o.json")
    base = ["detection", *TINY, "--out", out]
    train_images, val = digits["train"][1], ["--test", digits["val"][0], "--test-images", digits["val"][1]]
    model = ["--model", f"scratch:{ARCH}"]
    missing = str(tmp_path / "nope.json")
    assert_one_line_error(invoke(evaluate_cli, [*base, *model, "--train", missing, "--train-images", train_images,
                                                *val]), f"--train {missing}: cannot read the annotation file")
    text = _write(tmp_path / "t.json", "{not json")
    assert_one_line_error(invoke(evaluate_cli, [*base, *model, "--train", text, "--train-images", train_images, *val]),
                          f"--train {text}: not JSON")
    labels = _write(tmp_path / "l.json", {"images": [], "labels": []})
    assert_one_line_error(invoke(evaluate_cli, [*base, *model, "--train", labels, "--train-images", train_images,
                                                *val]), f"--train {labels}: not COCO instances JSON")
    folder = tmp_path / "images"
    folder.mkdir()
    for png in sorted(Path(train_images).iterdir())[1:]:
        (folder / png.name).write_bytes(png.read_bytes())
    assert_one_line_error(invoke(evaluate_cli, [*base, *model, "--train", digits["train"][0], "--train-images",
                                                str(folder), *val]),
                          f"--train-images {folder}: 1 of 8 image files are missing (first: 000001.png)")
    data = ["--train", digits["train"][0], "--train-images", train_images, *val]
    assert_one_line_error(invoke(evaluate_cli, [*base, "--model", "scratch:test_vit", *data]),
                          "--model scratch:test_vit: no feature-pyramid mapping for this architecture")
    assert_one_line_error(invoke(evaluate_cli, [*base, *model, *data, "--resume"]),
                          f"--resume: no checkpoint at {tmp_path / 'o.ckpt' / 'detection.pt'}")
    assert_one_line_error(invoke(evaluate_cli, [*base, *model, "--train", digits["train"][0], *val]),
                          f"--train {digits['train'][0]}: give its image folder with --train-images")
    assert not Path(out).exists()


def test_an_undecodable_image_in_a_worker_is_one_line(digits, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for png in Path(digits["train"][1]).iterdir():
        (images / png.name).write_bytes(png.read_bytes())
    (images / "000003.png").write_bytes(b"not a png")
    result = invoke(evaluate_cli, ["detection", "--model", f"scratch:{ARCH}", "--train", digits["train"][0],
                                   "--train-images", str(images), "--test", digits["val"][0], "--test-images",
                                   digits["val"][1], *TINY, "--workers", "1", "--out", str(tmp_path / "o.json")])
    assert_one_line_error(result, f"{images}/000003.png: not a decodable image (UnidentifiedImageError)")


def test_the_coco_transfer_pipeline_file_is_the_papers_setting():
    from hgkd.pipelines.spec import load_spec

    spec = load_spec(str(Path(__file__).parents[1] / "pipelines" / "coco_transfer.yaml"))
    assert spec.eval.tasks == ["detection"] and spec.teacher["name"] == "cae_large_patch16"
    options = spec.eval.options["detection"]
    assert (options["recipe"], options["epochs"], options["batch_size"], options["detector"]) == \
        ("1x", 12, 16, "maskrcnn")
    assert {v.get("student") for v in spec.variants} == {"resnet50", "resnet34"}
    with pytest.raises(HgkdError, match=r"eval options of detection: unknown \['bogus'\]"):
        load_spec(str(Path(__file__).parents[1] / "pipelines" / "coco_transfer.yaml"),
                  ["eval.options.detection.bogus=1"])

