"""hgkd.evaluate: students as dense timm models, labelled data, kNN / probes / fine-tuning, CLI.

The labelled set is real: crops of six of scikit-image's photographs (label = source photo),
with pixel noise, as JPEGs in webdataset tars. A randomly initialised ResNet-18 at 64 px
separates them well - and must not when the labels are shuffled.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from hgkd.errors import HgkdError
from hgkd.evaluate import (extract_features, finetune, knn_eval, linear_probe, load_labelled, load_student,
                           load_train_test, run_task, split)
from hgkd.evaluate.cli import main as evaluate_cli
from hgkd.evaluate.data import align_classes, labelled_few
from hgkd.evaluate.probe import class_index, knn_votes
from hgkd.data.demo_data import _jpeg, _load

from conftest import corrupt_jpeg

PHOTOS = ("chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "grass", "colorwheel")
PER_CLASS = 32
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (as conftest sets for the suite) is fastest, and far
    faster than two when other processes share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo_crops(per_class: int, size: int = SIZE, seed: int = 0) -> list[tuple[str, np.ndarray, int]]:
    """(key, uint8 HxWx3 crop, label): random 70-95% crops of each photo, resized, with noise."""
    rng = np.random.default_rng(seed)
    out = []
    for label, name in enumerate(PHOTOS):
        photo = _load(name)
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo
        h, w = photo.shape[:2]
        for i in range(per_class):
            s = int(rng.uniform(0.7, 0.95) * min(h, w))
            top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            crop = Image.fromarray(photo[top:top + s, left:left + s]).resize((size, size), Image.BILINEAR)
            noisy = np.clip(np.asarray(crop, np.float64) + rng.normal(0, 8, (size, size, 3)), 0, 255)
            out.append((f"{name}/{i:03d}", noisy.astype(np.uint8), label))
    return out


def write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


@pytest.fixture(scope="module")
def crops_tars(tmp_path_factory) -> str:
    """The crops in two shards (interleaved classes), plus one unlabelled and one corrupt sample."""
    out = tmp_path_factory.mktemp("eval-tars")
    samples = [{"__key__": k, "jpg": _jpeg(img), "cls": str(y)} for k, img, y in photo_crops(PER_CLASS)]
    samples = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    samples.insert(5, {"__key__": "extra/unlabelled", "jpg": samples[0]["jpg"]})
    samples.insert(9, {"__key__": "extra/corrupt", "jpg": corrupt_jpeg(), "cls": "0"})
    half = len(samples) // 2
    write_tar(out / "crops-000.tar", samples[:half])
    write_tar(out / "crops-001.tar", samples[half:])
    return str(out / "crops-{000..001}.tar")


@pytest.fixture(scope="module")
def features(crops_tars):
    """Features of a half/half stratified split by a random ResNet-18 (the scratch baseline)."""
    train, test = load_train_test(crops_tars, None, img_size=SIZE, test_fraction=0.5, seed=0, crop_pct=1.0)
    model = load_student("scratch:resnet18")
    return extract_features(model, train, 32), train.labels, extract_features(model, test, 32), test.labels


# ------------------------------------------------------------------------------------------ data


def test_labelled_tars_skip_and_count(crops_tars):
    data = load_labelled(crops_tars, img_size=SIZE, crop_pct=0.875)
    assert len(data) == len(PHOTOS) * PER_CLASS and data.num_classes == len(PHOTOS)
    assert (data.skipped_unlabelled, data.skipped_undecodable) == (1, 1)
    assert data.store_size == 73 and data.checked  # round(64 / 0.875); nothing decoded is kept
    x, y = data.dataset()[0]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and y == int(data.labels[0])
    assert -2.5 < float(x.mean()) < 2.5  # ImageNet-normalised, not 0..255


def test_split_is_stratified_disjoint_and_seeded(crops_tars):
    data = load_labelled(crops_tars, img_size=32)
    train, test = split(data, 0.25, seed=3)
    assert set(train.keys).isdisjoint(test.keys) and len(train) + len(test) == len(data)
    assert torch.bincount(test.labels).tolist() == [PER_CLASS // 4] * len(PHOTOS)
    assert split(data, 0.25, seed=3)[1].keys == test.keys and split(data, 0.25, seed=4)[1].keys != test.keys


def test_train_augmentation_is_seeded_per_epoch(crops_tars):
    data = load_labelled(crops_tars, img_size=32)
    a, b = data.dataset(train=True, seed=1), data.dataset(train=True, seed=1)
    assert torch.equal(a[3][0], b[3][0])
    b.set_epoch(1)
    assert not torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], data.dataset()[3][0])


def test_image_folders_align_class_names(tmp_path):
    for split_name, classes in (("train", ("ant", "bee", "cat")), ("test", ("bee", "cat"))):
        for label, cls in enumerate(classes):
            (tmp_path / split_name / cls).mkdir(parents=True)
            for i in range(3):
                image = Image.fromarray(np.full((20, 24, 3), 40 * label + i, np.uint8))
                image.save(tmp_path / split_name / cls / f"{i}.png")
    train, test = load_train_test(str(tmp_path / "train"), str(tmp_path / "test"), img_size=16)
    assert train.classes == ["ant", "bee", "cat"] and test.classes == train.classes
    assert test.labels.tolist() == [1, 1, 1, 2, 2, 2]  # bee, cat re-numbered as in train
    with pytest.raises(HgkdError, match=r"classes \['ant'\] are not in --train"):
        align_classes(load_labelled(str(tmp_path / "test"), img_size=16), train)


def test_no_labels_is_a_user_error(tmp_path):
    tar = write_tar(tmp_path / "unlabelled.tar", [{"__key__": "a", "jpg": _jpeg(_load("coffee"))}])
    with pytest.raises(HgkdError, match="no labelled, decodable images"):
        load_labelled(tar, img_size=32)
    with pytest.raises(HgkdError, match="--train: .*missing.tar does not exist"):
        load_train_test(str(tmp_path / "missing.tar"))


# ---------------------------------------------------------------------------------------- probes


@pytest.mark.parametrize("method", ["knn", "linear", "mlp"])
def test_separable_photos_are_separated(features, method):
    train_f, train_y, test_f, test_y = features
    result = run_method(method, train_f, train_y, test_f, test_y)
    assert result["n_classes"] == len(PHOTOS) and result["n_test"] == len(test_y) == len(PHOTOS) * PER_CLASS // 2
    assert result["top1"] >= 85.0, result
    assert result["top5"] >= result["top1"]


@pytest.mark.parametrize("method", ["knn", "linear", "mlp"])
def test_shuffled_labels_give_chance(features, method):
    train_f, train_y, test_f, test_y = features
    g = torch.Generator().manual_seed(0)
    shuffled_train = train_y[torch.randperm(len(train_y), generator=g)]
    shuffled_test = test_y[torch.randperm(len(test_y), generator=g)]
    result = run_method(method, train_f, shuffled_train, test_f, shuffled_test)
    assert result["top1"] <= 40.0, result  # chance is 16.7%; the same features gave >= 85%
    if method == "mlp":
        assert result["train_top1"] >= 90.0  # it memorised the training labels, and that does not transfer


def run_method(method, train_f, train_y, test_f, test_y) -> dict:
    if method == "knn":
        return knn_eval(train_f, train_y, test_f, test_y)
    return linear_probe(train_f, train_y, test_f, test_y, head=method, epochs=100, seed=0)


def test_probe_is_seeded():
    x, y = torch.randn(40, 8), torch.arange(40) % 4
    a = linear_probe(x, y, x[:10], y[:10], head="mlp", epochs=3, seed=5, hidden=16)
    b = linear_probe(x, y, x[:10], y[:10], head="mlp", epochs=3, seed=5, hidden=16)
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b and a["hidden"] == 16


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(30, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.tensor([3, 7, 11, 42])  # arbitrary label values
    train_y, test_y = labels[torch.randint(0, 4, (30,), generator=g)], labels[torch.randint(0, 4, (9,), generator=g)]
    k, temp = 5, 0.1
    expected = np.zeros((9, 4))
    tr = train_f.numpy() / np.linalg.norm(train_f.numpy(), axis=1, keepdims=True)
    for i, q in enumerate(test_f.numpy()):
        sims = tr @ (q / np.linalg.norm(q))
        for j in np.argsort(-sims)[:k]:
            expected[i, list(labels.tolist()).index(int(train_y[j]))] += np.exp(sims[j] / temp)
    train_i, test_i, classes = class_index(train_y, test_y)
    votes = knn_votes(train_f, train_i, test_f, len(classes), k, temp, chunk=4)
    np.testing.assert_allclose(votes.numpy(), expected, rtol=1e-5)
    result = knn_eval(train_f, train_y, test_f, test_y, k=k, temperature=temp)
    hits1 = expected.argmax(1) == test_i.numpy()
    hits4 = (np.argsort(-expected, 1)[:, :4] == test_i.numpy()[:, None]).any(1)
    assert result["top1"] == pytest.approx(100 * hits1.mean(), abs=1e-4)
    assert result["top5_k"] == 4 and result["top5"] == pytest.approx(100 * hits4.mean()) == pytest.approx(100.0)


def test_top5_clipped_and_unseen_test_labels_count_wrong():
    x = torch.eye(3).repeat(4, 1)
    y = torch.tensor([0, 1, 2]).repeat(4)
    result = knn_eval(x, y, x[:3], torch.tensor([0, 1, 9]), k=3)
    assert result["top5_k"] == 3
    assert result["top1"] == pytest.approx(200 / 3) and result["top5"] == pytest.approx(200 / 3)  # label 9: never


# ---------------------------------------------------------------------------------------- models


def _same_output(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a(x), b(x))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(123)
    return timm.create_model("resnet18", num_classes=0).eval()


def test_load_exported_safetensors(tmp_path, reference):
    path = tmp_path / "student.safetensors"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path), metadata={"architecture": "resnet18", "format": "timm"})
    model = load_student(str(path))
    assert not model.training and model.num_classes == 0 and _same_output(model, reference)
    with pytest.raises(HgkdError, match="holds a resnet18, not the requested resnet34"):
        load_student(str(path), arch="resnet34")
    save_file(state, str(tmp_path / "bare.safetensors"))
    with pytest.raises(HgkdError, match="records no architecture"):
        load_student(str(tmp_path / "bare.safetensors"))
    assert _same_output(load_student(str(tmp_path / "bare.safetensors"), arch="resnet18"), reference)


def test_load_run_directory(tmp_path, reference):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model_state = {f"encoder.body.{k}": v for k, v in reference.state_dict().items()}
    model_state["decoder.blocks.0.up.weight"] = torch.zeros(2, 2)  # ignored: not the encoder
    torch.save({"model": model_state, "config": {"student": "resnet18", "epochs": 1}, "epoch": 1},
               run / "checkpoints" / "last.pt")
    assert _same_output(load_student(str(run)), reference)
    assert _same_output(load_student(str(run / "checkpoints" / "last.pt")), reference)
    torch.save({"model": model_state, "config": {"student": "resnet34"}}, run / "checkpoints" / "last.pt")
    with pytest.raises(HgkdError, match="do not fit timm resnet34"):
        load_student(str(run))
    torch.save({"model": {"decoder.x": torch.zeros(1)}, "config": {"student": "resnet18"}},
               run / "checkpoints" / "last.pt")
    with pytest.raises(HgkdError, match="no student encoder weights"):
        load_student(str(run))


def test_scratch_models_and_errors(tmp_path):
    a, b = load_student("scratch:resnet18"), load_student("scratch:resnet18")
    c = load_student("scratch:resnet18", seed=1)
    assert _same_output(a, b) and not _same_output(a, c)
    with pytest.raises(HgkdError, match="unknown timm architecture"):
        load_student("scratch:no_such_net")
    with pytest.raises(HgkdError, match="no such file or directory"):
        load_student(str(tmp_path / "missing.safetensors"))
    with pytest.raises(HgkdError, match="needs checkpoints/last.pt"):
        load_student(str(tmp_path))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HgkdError, match="unreadable checkpoint"):
        load_student(str(tmp_path / "junk.pt"))


# -------------------------------------------------------------------------------------- finetune


def test_finetune_one_epoch(crops_tars):
    train, test = load_train_test(crops_tars, None, img_size=32, test_fraction=0.25, seed=0)
    model = load_student("scratch:resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, train, test, epochs=1, batch_size=64, seed=0, min_scale=0.3)
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0 and np.isfinite(result["final_loss"])
    assert (result["n_train"], result["n_test"], result["n_classes"]) == (len(train), len(test), len(PHOTOS))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trained a copy


def test_finetune_on_a_few_labels_per_class(crops_tars):
    """The semi-supervised protocol (issue 22): the same number of labelled images of every
    class, drawn with the seed (another seed, another draw), the test set untouched."""
    train, test = load_train_test(crops_tars, None, img_size=32, test_fraction=0.25, seed=0)
    few = [labelled_few(train, 3, seed) for seed in (0, 0, 1)]
    assert all(sorted(np.bincount(f.labels.numpy()).tolist()) == [3] * len(PHOTOS) for f in few)
    assert few[0].keys == few[1].keys and few[0].keys != few[2].keys and set(few[0].keys) <= set(train.keys)
    result = finetune(load_student("scratch:resnet18"), train, test, epochs=1, batch_size=8, seed=0, min_scale=0.3,
                      labels_per_class=3)
    assert (result["n_labelled"], result["labels_per_class"], result["n_test"]) == (3 * len(PHOTOS), 3, len(test))
    with pytest.raises(HgkdError, match="labels_per_class 0"):
        labelled_few(train, 0)


def test_run_task_api_on_loaded_sets(crops_tars):
    data = load_labelled(crops_tars, img_size=32)
    record = run_task("knn", load_student("scratch:resnet18"), data, test_fraction=0.25, k=5)
    assert record["task"] == "knn" and record["model"] == "ResNet" and record["k"] == 5
    assert (record["n_train"], record["n_test"], record["test"]) == (144, 48, None)
    with pytest.raises(HgkdError, match=r"knn: unknown options \['epochs'\]"):
        run_task("knn", "scratch:resnet18", data, epochs=3)
    with pytest.raises(HgkdError, match="unknown evaluation task"):
        run_task("segmentation", "scratch:resnet18", data)


# ------------------------------------------------------------------------------------------- CLI

COMMON = ["--model", "scratch:resnet18", "--img-size", "32", "--batch-size", "32"]


@pytest.mark.parametrize("command, task", [(["knn", "--k", "10"], "knn"),
                                           (["linear", "--head", "mlp", "--epochs", "20"], "mlp"),
                                           (["linear", "--head", "linear", "--epochs", "20"], "linear"),
                                           (["finetune", "--epochs", "1", "--min-scale", "0.5"], "finetune")])
def test_cli_writes_results(crops_tars, tmp_path, command, task):
    out = tmp_path / "result.json"
    result = CliRunner().invoke(evaluate_cli, [*command, *COMMON, "--train", crops_tars, "--test-fraction", "0.25",
                                               "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["task"] == task and record["model"] == "scratch:resnet18"
    assert (record["n_train"], record["n_test"], record["n_classes"]) == (144, 48, len(PHOTOS))
    assert 0 <= record["top1"] <= record["top5"] <= 100 and record["top1"] > (10 if task == "finetune" else 50)
    assert record["skipped_unlabelled"] == 1 and record["skipped_undecodable"] == 1
    assert result.output.count("\n") == 1 and result.output.startswith(f"{task} scratch:resnet18: top-1")


def test_cli_finetunes_on_a_few_labels_per_class(crops_tars, tmp_path):
    out = tmp_path / "few.json"
    result = CliRunner().invoke(evaluate_cli, ["finetune", "--epochs", "1", "--labels-per-class", "3", *COMMON,
                                               "--train", crops_tars, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert (record["labels_per_class"], record["n_labelled"], record["n_test"]) == (3, 3 * len(PHOTOS), 48)


def test_cli_separate_test_set(crops_tars, tmp_path):
    test_tar = write_tar(tmp_path / "test.tar", [{"__key__": k, "jpg": _jpeg(img), "cls": str(y)}
                                                  for k, img, y in photo_crops(4, seed=7)])
    out = tmp_path / "knn.json"
    result = CliRunner().invoke(evaluate_cli, ["knn", *COMMON, "--train", crops_tars, "--test", test_tar,
                                               "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert (record["n_train"], record["n_test"], record["test"], record["test_fraction"]) == (192, 24, test_tar, None)


def test_cli_bad_model_is_one_line_exit_2(crops_tars, tmp_path):
    out = tmp_path / "x.json"
    args = ["knn", "--model", str(tmp_path / "nope.safetensors"), "--train", crops_tars, "--out", str(out)]
    result = subprocess.run([sys.executable, "-m", "hgkd.evaluate.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: --model") and result.stderr.count("\n") == 1
    assert not out.exists()
