"""Stage one end to end: real tars -> tiny real teacher -> real Zarr cache on disk."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hgkd.data.sources import open_source
from hgkd.extract.teachers.base import create_teacher
from hgkd.data.views import ViewConfig, ViewParams, decode_image, render_view
from hgkd.storage.cache import STATUS_OK, STATUS_SKIPPED, FeatureCache
from hgkd.storage.locks import ShardLock
from hgkd.storage.verify import verify_cache

from conftest import (IMG, TINY_TEACHER, corrupt_jpeg, extract_args, kill_extract_when, run_cli, run_cli_subprocess,
                      write_tars)

ARRAYS = ["tokens", "pooled", "mask", "valid", "key", "index", "view_index", "src_hw", "crop", "flip", "label", "status"]


def all_arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def sources_by_key(data: str) -> dict[str, torch.Tensor]:
    return {s.key: decode_image(s.data) for s in open_source([data])}


def test_cache_roundtrip_matches_teacher_on_recreated_views(f32_cache, photo_tars):
    """Every array holds what the teacher produced on the view re-created from stored params."""
    cache = FeatureCache.open(f32_cache)
    assert cache.is_complete() and cache.num_views == 24 and cache.num_shards == 3
    data = cache.read(range(cache.num_views))
    view_cfg = ViewConfig.from_json(cache.meta.view)
    torch.manual_seed(0)
    teacher = create_teacher(TINY_TEACHER, img_size=IMG)
    images = sources_by_key(photo_tars)
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(teacher.std).view(1, 3, 1, 1) * 255
    for row in range(cache.num_views):
        assert data["status"][row] == STATUS_OK
        assert data["index"][row] == row // 2 and data["view_index"][row] == row % 2
        image = images[data["key"][row]]
        assert tuple(data["src_hw"][row]) == tuple(image.shape[1:])
        params = ViewParams(tuple(data["crop"][row]), bool(data["flip"][row]), data["mask"][row].reshape(4, 4))
        assert params.mask_hw.sum() == 8  # mask ratio 0.5 of 16 patches
        x = (render_view(image, params, view_cfg)[None].float() - mean) / std
        tokens, valid = teacher.forward_masked(x, torch.from_numpy(data["mask"][row])[None])
        np.testing.assert_array_equal(data["valid"][row], valid[0].numpy())
        np.testing.assert_allclose(data["tokens"][row], tokens[0].numpy(), atol=1e-5)
        pooled = torch.nn.functional.normalize(tokens[0][valid[0]].mean(0), dim=0)
        np.testing.assert_allclose(data["pooled"][row].astype(np.float32), pooled.numpy(), atol=2e-3)
    labels = data["label"][::2]
    assert sorted(labels.tolist()) == list(range(12))


def test_student_side_view_is_pixel_identical_to_teacher_input(photo_tars, tmp_path):
    """Capture the exact batch the teacher saw and re-create it from the cache alone."""
    from hgkd.extract import run as run_mod

    seen: list[torch.Tensor] = []
    original = run_mod.Extractor.teacher_outputs

    def capture(self, views_vchw, mask_vn):
        seen.append(views_vchw.clone())
        return original(self, views_vchw, mask_vn)

    run_mod.Extractor.teacher_outputs = capture
    try:
        out = str(tmp_path / "c.zarr")
        assert run_cli(extract_args(photo_tars, out, "--views-per-image", "1")).exit_code == 0
    finally:
        run_mod.Extractor.teacher_outputs = original
    teacher_saw = torch.cat(seen)
    cache = FeatureCache.open(out)
    data = cache.read(range(cache.num_views))
    view_cfg = ViewConfig.from_json(cache.meta.view)
    images = sources_by_key(photo_tars)
    for row in range(cache.num_views):
        params = ViewParams(tuple(data["crop"][row]), bool(data["flip"][row]), data["mask"][row].reshape(4, 4))
        assert torch.equal(render_view(images[data["key"][row]], params, view_cfg), teacher_saw[row])
    assert data["flip"].any() and not data["flip"].all()  # both branches exercised
    from hgkd.distill.data import CacheViewDataset

    batch = CacheViewDataset(out, [photo_tars])[list(range(cache.num_views))].ready()  # stage two's loader
    assert torch.equal(batch.images, teacher_saw)
    assert torch.equal(batch.visible.flatten(1), torch.from_numpy(~data["mask"]))


def test_plain_zarr_open_reads_the_cache(f32_cache):
    group = zarr.open(f32_cache, mode="r")
    assert set(ARRAYS) <= set(group.array_keys())
    assert group["tokens"].shape == (24, 16, 64)
    assert group["tokens"].metadata.codecs[0].chunk_shape == (1, 16, 64)  # one view per chunk, sharded
    assert group.attrs["hgkd"]["status"] == "complete"
    assert len(list(group["shards"].group_keys())) == 3


def test_verify_clean_then_catches_flipped_bytes(photo_tars, tmp_path):
    out = tmp_path / "c.zarr"
    assert run_cli(extract_args(photo_tars, str(out))).exit_code == 0
    assert verify_cache(str(out)).ok
    shard_file = out / "tokens" / "c" / "1" / "0" / "0"
    blob = bytearray(shard_file.read_bytes())
    blob[100] ^= 0xFF
    shard_file.write_bytes(bytes(blob))
    result = run_cli(["verify", str(out)])
    assert result.exit_code == 1
    assert "shard 1 (rows 8-15): array 'tokens' is corrupt" in result.output


def test_verify_catches_missing_shard_file(photo_tars, tmp_path):
    out = tmp_path / "c.zarr"
    assert run_cli(extract_args(photo_tars, str(out))).exit_code == 0
    (out / "pooled" / "c" / "2" / "0").unlink()
    report = verify_cache(str(out))
    assert report.problems == ["shard 2 (rows 16-23): array 'pooled' has no data on storage (file missing)"]


def test_undecodable_images_are_skipped_counted_and_listed(tmp_path):
    extra = {"img/broken": {"jpg": corrupt_jpeg()}, "img/textonly": {"txt": b"not an image"}}
    data = write_tars(tmp_path / "tars", ["astronaut", "coffee", "rocket"], per_shard=3, extra=extra)
    out = str(tmp_path / "c.zarr")
    result = run_cli(extract_args(data, out))
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    status = cache.read(range(cache.num_views), ["status", "key"])
    skipped_keys = set(status["key"][status["status"] == STATUS_SKIPPED])
    assert skipped_keys == {"img/broken", "img/textonly"}
    assert int((status["status"] == STATUS_OK).sum()) == 6
    assert {s["key"] for s in cache.meta.skipped} == {"img/broken", "img/textonly"}
    assert verify_cache(out).ok


def test_resume_after_kill_9_equals_uninterrupted_run(photo_tars, tmp_path):
    reference = str(tmp_path / "ref.zarr")
    assert run_cli(extract_args(photo_tars, reference, "--shard-views", "4")).exit_code == 0
    resumed = tmp_path / "resumed.zarr"
    args = extract_args(photo_tars, str(resumed), "--shard-views", "4")
    kill_extract_when(args, resumed / "shards" / "000001")
    partial = FeatureCache.open(str(resumed))
    assert 0 < len(partial.completed_shards()) < partial.num_shards, "kill must land mid-run"
    assert not partial.is_complete() and not verify_cache(str(resumed)).ok
    assert run_cli(args).exit_code == 0
    ref, got = all_arrays(reference), all_arrays(str(resumed))
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert verify_cache(str(resumed)).ok


def test_refuses_to_append_with_other_settings(f32_cache, photo_tars):
    result = run_cli_subprocess(extract_args(photo_tars, f32_cache, "--codec", "f32", "--mask-ratio", "0.75"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "holds a cache made with other settings" in result.stderr
    assert "view.mask_ratio: 0.5 != 0.75" in result.stderr
    assert verify_cache(f32_cache).ok


def test_shard_owned_by_another_live_writer_is_never_written(photo_tars, tmp_path):
    out = str(tmp_path / "c.zarr")
    args = extract_args(photo_tars, out)
    assert run_cli([*args[:-1], "--rank", "1", "--world-size", "3"]).exit_code == 0  # creates cache, writes shard 1
    cache = FeatureCache.open(out)
    assert cache.completed_shards() == {1}
    lock = ShardLock(Path(out), 0)
    assert lock.try_acquire()  # a live "other writer" holds shard 0
    try:
        assert run_cli(args).exit_code == 0
        assert FeatureCache.open(out).completed_shards() == {1, 2}
        assert not ShardLock(Path(out), 0).try_acquire()
    finally:
        lock.release()
    assert run_cli(args).exit_code == 0
    assert FeatureCache.open(out).is_complete() and verify_cache(out).ok


def test_two_processes_on_one_cache_split_the_shards(photo_tars, tmp_path):
    out = str(tmp_path / "c.zarr")
    args = extract_args(photo_tars, out, "--shard-views", "2")
    procs = [subprocess.Popen([sys.executable, "-m", "hgkd.extract.cli", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    report = verify_cache(out)
    assert report.ok and report.views_ok == 24, report.problems
    writers = {FeatureCache.open(out).shard_record(s)["writer"] for s in range(12)}
    assert len(writers) >= 1


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/x-{000..001}.tar"], "/nonexistent/x-000.tar does not exist"),
    (["--teacher", "vit_huge_nonsense"], "unknown teacher 'vit_huge_nonsense'"),
    (["--shard-views", "7"], "--shard-views 7 must be a multiple of --views-per-image 2"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(photo_tars, tmp_path, args, message):
    out = tmp_path / "c.zarr"
    base = extract_args(photo_tars, str(out))
    for i in range(0, len(args), 2):
        base[base.index(args[i]) + 1] = args[i + 1]
    result = run_cli_subprocess(base)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not FeatureCache.exists(str(out))


def test_wrong_checkpoint_is_a_clear_error(photo_tars, tmp_path):
    torch.manual_seed(0)
    other = create_teacher("beit_tiny_patch16", img_size=IMG)
    ckpt = tmp_path / "beit.pth"
    torch.save({"model": other.state_dict()}, ckpt)
    result = run_cli_subprocess(extract_args(photo_tars, str(tmp_path / "c.zarr"), "--checkpoint", str(ckpt)))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert str(ckpt) in result.stderr and TINY_TEACHER in result.stderr


def test_info_reports_metadata_and_size(f32_cache):
    result = run_cli(["info", f32_cache])
    assert result.exit_code == 0
    assert "complete; 3/3 shards" in result.output and "codec=f32" in result.output
    per_view = float(result.output.split("size")[1].split("KiB")[0])
    arrays = [p for p in Path(f32_cache).iterdir() if p.is_dir() and p.name not in ("shards", "fingerprint")]
    on_disk = sum(f.stat().st_size for a in arrays for f in a.rglob("*") if f.is_file())
    assert per_view == pytest.approx(on_disk / 24 / 1024, abs=0.05)
    meta = json.loads(run_cli(["info", "--json", f32_cache]).output)
    assert meta["dataset"]["num_samples"] == 12 and len(meta["dataset"]["shards"]) == 3
