"""Streaming evaluation (issue 15): the frozen-feature cache, probes and kNN read from it in
blocks, and the evaluation-task registry (issue 14). Real tars, a real Zarr store, a real
randomly initialised timm ResNet-18 at 32 px."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hgkd.data.demo_data import _jpeg
from hgkd.errors import HgkdError
from hgkd.evaluate import extract_features, load_labelled, load_student, run_task
from hgkd.evaluate.features import FeatureRows, decodable, frozen_features, rows_of
from hgkd.evaluate.probe import block_rows, class_index, epoch_batches, knn_eval, knn_votes, linear_probe
from hgkd.evaluate.registry import TASKS
from hgkd.pipelines.spec import spec_from_dict
from hgkd.storage.features import STATUS_OK, STATUS_UNDECODABLE, FeatureStore

from conftest import corrupt_jpeg
from test_evaluate import PHOTOS, photo_crops, write_tar


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("stream-tars")
    samples = [{"__key__": k, "jpg": _jpeg(img), "cls": str(y)} for k, img, y in photo_crops(12, size=40)]
    samples = [samples[i] for i in np.random.default_rng(1).permutation(len(samples))]
    samples.insert(7, {"__key__": "extra/corrupt", "jpg": corrupt_jpeg(), "cls": "1"})
    write_tar(out / "s-000.tar", samples[:40])
    write_tar(out / "s-001.tar", samples[40:])
    return str(out / "s-{000..001}.tar")


@pytest.fixture(scope="module")
def model():
    return load_student("scratch:resnet18")


def shard_files(store_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(store_dir / "features")): p.stat().st_mtime_ns for p in (store_dir / "features").rglob("*")
            if p.is_file()}


def test_feature_cache_holds_the_backbone_features_and_is_reused(tars, model, tmp_path):
    data = load_labelled(tars, img_size=32, check=False)
    store = frozen_features(model, data, tmp_path, batch_size=16, shard_rows=16)
    assert store.is_complete and store.num_shards == -(-len(data) // 16) and store.dim == 512
    status = store.status()
    assert (status == STATUS_UNDECODABLE).sum() == 1 and (status == STATUS_OK).sum() == len(data) - 1
    ok = decodable(store, data)
    checked = load_labelled(tars, img_size=32)  # decoded once, undecodable left out
    assert checked.keys == [k for k, good in zip(data.keys, ok) if good]
    cached = FeatureRows(store, rows_of(store, checked)).load()
    torch.testing.assert_close(cached, extract_features(model, checked, 16), rtol=1e-4, atol=1e-5)
    (store_dir,) = tmp_path.glob("*.zarr")
    before = shard_files(store_dir)
    again = frozen_features(model, data, tmp_path, batch_size=16, shard_rows=16)
    assert again.url == store.url and shard_files(store_dir) == before  # read back, nothing recomputed
    other = load_student("scratch:resnet18", seed=1)
    assert frozen_features(other, data, tmp_path, shard_rows=16).url != store.url  # other weights, other cache


def test_interrupted_feature_cache_is_refused_then_resumed(tars, model, tmp_path):
    data = load_labelled(tars, img_size=32, check=False)
    store = frozen_features(model, data, tmp_path, batch_size=16, shard_rows=16)
    full = FeatureRows(store, np.arange(store.num_rows)).load()
    store_dir = Path(store.url)
    # as after a kill during shard 2: its record gone, the root not yet complete
    group = zarr.open_group(store.url, mode="a")
    group.attrs["hgkd"] = {**group.attrs["hgkd"], "status": "incomplete"}
    shutil.rmtree(store_dir / "shards" / "000002")
    with pytest.raises(HgkdError, match="incomplete .1 of 5 shards missing"):
        FeatureStore.open(store.url)
    before = shard_files(store_dir)
    resumed = frozen_features(model, data, tmp_path, batch_size=16, shard_rows=16)
    after = shard_files(store_dir)
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed == ["c/2/0"]  # only the unrecorded shard was written again
    assert FeatureStore.open(resumed.url).is_complete
    torch.testing.assert_close(FeatureRows(resumed, np.arange(resumed.num_rows)).load(), full)


def test_feature_cache_made_for_other_settings_is_refused(tars, model, tmp_path):
    data = load_labelled(tars, img_size=32, check=False)
    store = frozen_features(model, data, tmp_path, shard_rows=16)
    with pytest.raises(HgkdError, match="feature cache made for other settings"):
        FeatureStore.create_or_resume(store.url, {"model": "another"}, store.index(), 512)
    with pytest.raises(HgkdError, match="not an hgkd feature cache"):
        FeatureStore(zarr.open_group(str(tmp_path / "plain.zarr"), mode="w"), str(tmp_path / "plain.zarr"))


def test_damaged_feature_cache_is_one_line(tars, model, tmp_path):
    data = load_labelled(tars, img_size=32, check=False)
    store = frozen_features(model, data, tmp_path, shard_rows=16)
    shard = Path(store.url) / "features" / "c" / "1" / "0"
    damaged = bytearray(shard.read_bytes())
    damaged[40] ^= 0xFF  # a byte of the first inner chunk: its crc32c no longer matches
    shard.write_bytes(bytes(damaged))
    with pytest.raises(HgkdError, match=r"feature rows 16\.\. are damaged .*delete the feature cache"):
        run_task("knn", model, data, features_dir=tmp_path, img_size=32)


def test_block_reading_probe_and_knn_match_in_memory(tars, model, tmp_path):
    data = load_labelled(tars, img_size=32, check=False)
    store = frozen_features(model, data, tmp_path, shard_rows=16)
    rows = np.flatnonzero(store.status() == STATUS_OK)
    labels = data.labels[torch.from_numpy(rows)]
    train, test = FeatureRows(store, rows[::2]), FeatureRows(store, rows[1::2])
    train_y, test_y = labels[::2].contiguous(), labels[1::2].contiguous()
    # kNN: the bank scanned 5 rows at a time gives the votes of one scan in memory
    train_i, test_i, classes = class_index(train_y, test_y)
    blocked = knn_votes(train, train_i, test, len(classes), k=7, bank_rows=5, chunk=3)
    whole = knn_votes(train.load(), train_i, test.load(), len(classes), k=7)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=0)  # votes ~exp(1 / 0.07): float32 rounding
    # probe: one epoch from the cache in blocks covers every row once
    seen = torch.cat([y for _, y in epoch_batches(train, train_y, 8, torch.Generator().manual_seed(0), 10)])
    assert sorted(seen.tolist()) == sorted(train_y.tolist()) and len(seen) == len(train)
    streamed = linear_probe(train, train_y, test, test_y, head="mlp", epochs=60, memory_mb=1e-3)  # ~0 MB: blocks
    loaded = linear_probe(train, train_y, test, test_y, head="mlp", epochs=60)
    assert loaded["top1"] >= 60.0 and abs(streamed["top1"] - loaded["top1"]) <= 10.0, (streamed, loaded)  # chance 17
    assert knn_eval(train, train_y, test, test_y)["top1"] == knn_eval(train.load(), train_y, test.load(), test_y)["top1"]


def test_epoch_batches_from_the_cache_cross_block_boundaries(tmp_path):
    n = block_rows(3) * 2 + 100
    index = np.arange(n)
    store = FeatureStore.create_or_resume(str(tmp_path / "f.zarr"), {"m": 1}, index, 3, shard_rows=4096)
    feats = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    for shard in store.pending_shards():
        rows = store.rows_of_shard(shard)
        store.write_shard(shard, feats[rows.start:rows.stop], np.ones(len(rows), np.uint8))
    store.finalize()
    rows = FeatureRows(store, index[::3])
    labels = torch.from_numpy(index[::3])
    batches = list(epoch_batches(rows, labels, 100, torch.Generator().manual_seed(0), block_rows(3)))
    assert all(len(y) == 100 for _, y in batches[:-1]) and len(batches[-1][1]) <= 100
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert sorted(y.tolist()) == labels.tolist()
    assert torch.equal(x[:, 0], (y * 3).float())  # each row's features travel with its label


def test_all_undecodable_is_one_line(tmp_path, model):
    tar = write_tar(tmp_path / "bad.tar", [{"__key__": f"b{i}", "jpg": corrupt_jpeg(), "cls": "0"} for i in range(3)])
    with pytest.raises(HgkdError, match=r"--train .*bad.tar: no labelled, decodable images \(0 without a label, 3 "):
        run_task("knn", model, tar, features_dir=tmp_path / "f", img_size=32)


# ----------------------------------------------------------------------------- task registry


def test_task_registry_drives_run_task_and_the_pipeline_spec():
    assert TASKS.names() == ["detection", "finetune", "knn", "linear", "mlp"]
    assert {TASKS.get(n).inputs for n in TASKS.names()} == {"features", "images", "detection"}
    for name in TASKS.names():
        assert callable(TASKS.get(name).function())  # every entry point resolves
    blob = {"name": "x", "out": "/tmp/x", "data": ["d.tar"], "teacher": {"name": "t", "random_init": True},
            "variants": [{"name": "a"}]}
    spec = spec_from_dict({**blob, "eval": {"tasks": ["knn", "finetune"]}})
    assert spec.eval.features_dir == str(Path("/tmp/x") / "features")
    with pytest.raises(HgkdError, match=r"unknown eval tasks \['segment'\]; choose from \['detection', 'finetune', 'knn'"):
        spec_from_dict({**blob, "eval": {"tasks": ["knn", "segment"]}})
    with pytest.raises(HgkdError, match=r"eval options of knn: unknown \['epochs'\]"):
        spec_from_dict({**blob, "eval": {"tasks": ["knn"], "options": {"knn": {"epochs": 3}}}})


def test_killed_feature_extraction_resumes_to_the_same_features(tmp_path):
    """kill -9 the CLI once its first shard is recorded: the cache reads as incomplete, the next
    run finishes it, and its features equal an uninterrupted run's (ResNet-50: 512 rows per shard)."""
    import signal
    import subprocess
    import sys
    import time

    samples = [{"__key__": k, "jpg": _jpeg(img), "cls": str(y)} for k, img, y in photo_crops(100, size=32)]
    tar = write_tar(tmp_path / "many.tar", samples)  # 600 images: 2 shards
    args = ["knn", "--model", "scratch:resnet50", "--train", tar, "--img-size", "32", "--batch-size", "32"]
    features = tmp_path / "features"
    proc = subprocess.Popen([sys.executable, "-m", "hgkd.evaluate.cli", *args, "--features-dir", str(features),
                             "--out", str(tmp_path / "a.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(features.glob("*.zarr/shards/000000")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (url,) = features.glob("*.zarr")
    with pytest.raises(HgkdError, match="feature cache is incomplete"):
        FeatureStore.open(str(url))
    for out, where in (("b.json", features), ("c.json", tmp_path / "clean")):
        done = subprocess.run([sys.executable, "-m", "hgkd.evaluate.cli", *args, "--features-dir", str(where),
                               "--out", str(tmp_path / out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    (clean,) = (tmp_path / "clean").glob("*.zarr")
    resumed, fresh = FeatureStore.open(str(url)), FeatureStore.open(str(clean))
    assert resumed.num_shards == 2 and url.name == clean.name
    np.testing.assert_array_equal(resumed.read(0, resumed.num_rows), fresh.read(0, fresh.num_rows))
    assert not (tmp_path / "a.json").exists()
