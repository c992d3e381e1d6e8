"""Views budget (issue 12): epochs are image passes over cycled cached views, the online
teacher's fresh-view reference, fresh student masks over full-view caches, the cost ledger.

Real caches written by hgkd-extract (12 photos, K=2), tiny real teacher and students, CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import corrupt_jpeg, extract_args, run_cli, write_tars
from hgkd.data.demo_data import SKIMAGE_IMAGES
from hgkd.distill.checkpoint import LAST, load_checkpoint
from hgkd.distill.config import DistillConfig
from hgkd.distill.data import CacheViewDataset, ChunkAwareBatchSampler, EpochRows, whole_batch
from hgkd.distill.targets import make_targets
from hgkd.distill.train import Trainer
from hgkd.storage.cache import FeatureCache
from test_distill import distill_args, invoke, read_metrics

CPU = torch.device("cpu")
TEACHER = "mae_vit_tiny_patch16"
N_IMAGES, K = 12, 2


@pytest.fixture(scope="module")
def full_cache(photo_tars, tmp_path_factory) -> str:
    """K=2 views seen whole by the teacher, default shard size (256 views: one shard here)."""
    out = str(tmp_path_factory.mktemp("cache") / "full.zarr")
    result = run_cli(extract_args(photo_tars, out, "--codec", "f32", "--teacher-view", "full",
                                  "--shard-views", "256"))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def grown_cache(photo_tars, tmp_path_factory) -> str:
    """The f32 cache's settings made with K=1, then grown to K=2: views 1 are appended after a
    padding gap (rows 16..27), so the (image, view) -> row table must come from the cache's arrays."""
    out = str(tmp_path_factory.mktemp("cache") / "grown.zarr")
    for k_views in ("1", "2"):
        args = extract_args(photo_tars, out, "--codec", "f32")
        args[args.index("--views-per-image") + 1] = k_views
        result = run_cli(args)
        assert result.exit_code == 0, result.output
    return out


def one_line(output: str) -> bool:
    return len(output.strip().splitlines()) == 1


def cfg(data: str, out: Path, **kw) -> DistillConfig:
    base = dict(data=[data], out=str(out), student="resnet18", sparse_backend="masked", batch_size=4, epochs=3,
                warmup_epochs=0, queue_size=16, decoder_width=64, workers=0, log_every=0, device="cpu", img_size=64,
                mask_ratio=0.5)
    return DistillConfig(**{**base, **kw})


def epoch_rows(sampler: ChunkAwareBatchSampler, epoch: int) -> list[EpochRows]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("layout", ["image_major", "grown"])
def test_epoch_shows_view_e_mod_k_of_every_image_once(f32_cache, grown_cache, photo_tars, tmp_path, layout):
    cache = f32_cache if layout == "image_major" else grown_cache
    targets = make_targets(cfg(photo_tars, tmp_path, cache=cache), CPU)
    sampler = targets.sampler(4, seed=0, rank=0, world_size=1)
    assert targets.views == K and len(sampler) == N_IMAGES // 4  # an epoch is one pass over the images
    stored = FeatureCache.open(cache)
    arrays = stored.read(range(stored.num_views), ["index", "view_index"])
    for epoch in range(4):
        batches = epoch_rows(sampler, epoch)
        rows = np.concatenate(batches)
        assert all(b.epoch == epoch for b in batches)
        assert sorted(arrays["index"][rows].tolist()) == list(range(N_IMAGES))
        assert set(arrays["view_index"][rows].tolist()) == {epoch % K}
    batch = targets.dataset[epoch_rows(sampler, 1)[0]].ready()
    reference = CacheViewDataset(f32_cache, [photo_tars])  # same (image, view) in the image-major cache
    same = reference[[int(arrays["index"][r]) * K + 1 for r in batch.rows]].ready()
    assert torch.equal(batch.images, same.images) and torch.equal(batch.tokens, same.tokens)


def test_cache_views_uses_the_first_k_views(f32_cache, grown_cache, photo_tars, tmp_path):
    assert FeatureCache.open(grown_cache).num_views > N_IMAGES * K  # rows appended after a padding gap
    for cache in (f32_cache, grown_cache):
        targets = make_targets(cfg(photo_tars, tmp_path, cache=cache, cache_views=1), CPU)
        sampler = targets.sampler(4, seed=0, rank=0, world_size=1)
        views = FeatureCache.open(cache).read(targets.dataset.ok_rows, ["view_index"])["view_index"]
        assert targets.views == 1 and len(targets.dataset.ok_rows) == N_IMAGES and set(views.tolist()) == {0}
        assert np.array_equal(np.sort(np.concatenate(epoch_rows(sampler, 1))), targets.dataset.ok_rows)
    result = invoke(distill_args(f32_cache, photo_tars, str(tmp_path / "r"), "--cache-views", "3"))
    assert result.exit_code == 2 and one_line(result.output) and "holds 2 views per image" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("layout", ["image_major", "grown"])
def test_batches_are_shard_local(f32_cache, grown_cache, photo_tars, layout):
    """One shard per window, batch = a shard's images of this epoch's view: one shard per batch."""
    cache = f32_cache if layout == "image_major" else grown_cache
    dataset = CacheViewDataset(cache, [photo_tars])
    shard_views = FeatureCache.open(cache).shard_views  # 8: 4 or 8 images of one view per shard
    sampler = ChunkAwareBatchSampler(dataset.view_rows, shard_views, 4, seed=1, window=1)
    for epoch in range(2):
        batches = epoch_rows(sampler, epoch)
        assert all(len(set((np.asarray(b) // shard_views).tolist())) == 1 for b in batches)


def test_online_fresh_views_differ_per_epoch_and_equal_cache_view_e(f32_cache, photo_tars, tmp_path):
    """Online default (the paper): epoch e shows view e, i.e. view e of a cache with the same seed."""
    online = make_targets(cfg(photo_tars, tmp_path, online_teacher=TEACHER, epochs=5), CPU)
    cached = CacheViewDataset(f32_cache, [photo_tars])
    sampler = online.sampler(4, seed=0, rank=0, world_size=1)
    assert online.views == 0 and len(sampler) == N_IMAGES // 4
    first = {}
    for epoch in range(4):
        rows = np.concatenate(epoch_rows(sampler, epoch))
        samples, views = np.divmod(rows, online.row_views)
        assert sorted(samples.tolist()) == list(range(N_IMAGES)) and set(views.tolist()) == {epoch}
        got = online.complete(online.dataset[EpochRows(sorted(rows.tolist())[:4], epoch)])
        first[epoch] = got.images
        if epoch < K:  # the cache holds views 0..K-1
            want = cached[[int(s) * K + epoch for s in got.indices]].ready()
            assert torch.equal(got.images, want.images) and torch.equal(got.visible, want.visible)
            torch.testing.assert_close(got.tokens, want.tokens, atol=1e-5, rtol=0)
    assert all(not torch.equal(first[0], first[e]) for e in (1, 2, 3))


def test_online_views_k_gives_the_cached_runs_batches(full_cache, photo_tars, tmp_path):
    """--online-views K: same views, same batch order as a run on a K-view cache, same seed."""
    online = make_targets(cfg(photo_tars, tmp_path, online_teacher=TEACHER, teacher_view="full", online_views=K), CPU)
    cached = make_targets(cfg(photo_tars, tmp_path, cache=full_cache), CPU)  # the cache's view seed is 0 too
    samplers = [t.sampler(4, seed=0, rank=0, world_size=1) for t in (online, cached)]
    for epoch in range(3):
        pairs = list(zip(*(epoch_rows(s, epoch) for s in samplers)))
        assert [list(a) for a, _ in pairs] == [list(b) for _, b in pairs]
        for rows_online, rows_cached in pairs[:2]:
            got, want = online.complete(online.dataset[rows_online]), cached.dataset[rows_cached].ready()
            assert torch.equal(got.rows, want.rows) and torch.equal(got.images, want.images)
            assert torch.equal(got.visible, want.visible) and torch.equal(got.valid, want.valid)
            torch.testing.assert_close(got.tokens, want.tokens, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def twin_data(tmp_path_factory) -> tuple[str, str]:
    """12 photos and one undecodable image, a full-view K=2 cache in 8-view shards (4 shards,
    the skipped image's rows in one of them): what an online twin must follow exactly."""
    root = tmp_path_factory.mktemp("twin")
    tars = write_tars(root / "tars", list(SKIMAGE_IMAGES[:12]), per_shard=5, extra={"img/broken": {"jpg": corrupt_jpeg()}})
    out = str(root / "cache.zarr")
    result = run_cli(extract_args(tars, out, "--codec", "f32", "--teacher-view", "full"))
    assert result.exit_code == 0, result.output
    return tars, out


def test_online_twin_of_a_cache_reads_the_cached_runs_views_in_its_batches(twin_data, tmp_path):
    """``--online-teacher`` with ``--cache`` (issue 22): the cache's shard size, skipped image and
    view settings decide the batches; with --online-views K the very views of a --cache-views K
    run, with 0 the fresh view e; the queue pre-fill takes the cached run's rows."""
    tars, cache = twin_data
    cached = make_targets(cfg(tars, tmp_path, cache=cache, teacher_view="full"), CPU)
    arrays = FeatureCache.open(cache).read(np.arange(FeatureCache.open(cache).num_views), ["index", "view_index"])
    assert len(cached.dataset.view_rows) == N_IMAGES  # the broken image is out
    for views in (K, 0):
        online = make_targets(cfg(tars, tmp_path, online_teacher=TEACHER, cache=cache, online_views=views, epochs=3,
                                  mask_ratio=0.9), CPU)  # the cache's settings win over the options
        assert online.dataset.view_cfg.teacher_view == "full" and online.dataset.view_cfg.mask_ratio == 0.5
        samplers = [t.sampler(4, seed=3, rank=0, world_size=1) for t in (online, cached)]
        for epoch in range(3):
            pairs = list(zip(*(epoch_rows(s, epoch) for s in samplers)))
            assert len(pairs) == N_IMAGES // 4
            for rows_online, rows_cached in pairs:
                samples, shown = np.divmod(np.asarray(rows_online), online.row_views)
                assert samples.tolist() == arrays["index"][rows_cached].tolist()
                assert set(shown.tolist()) == {epoch % K if views else epoch}
            rows_online, rows_cached = pairs[0]
            samples, shown = np.divmod(np.asarray(rows_online), online.row_views)
            got = online.complete(online.dataset[rows_online])
            if views or epoch < K:  # the cache holds the view shown
                want = cached.dataset[[int(np.flatnonzero((arrays["index"] == s) & (arrays["view_index"] == v))[0])
                                       for s, v in zip(samples, shown)]].ready()
                order = np.argsort(arrays["index"][want.rows.numpy()])  # the cached batch is in row order
                assert got.indices.tolist() == sorted(samples.tolist())
                assert torch.equal(got.images, want.images[order])
                torch.testing.assert_close(got.tokens, want.tokens[order], atol=1e-5, rtol=0)
        pre_online, pre_cached = online.prefill_rows(5, seed=1), cached.prefill_rows(5, seed=1)
        assert (np.divmod(pre_online, online.row_views)[0] == arrays["index"][pre_cached]).all()


def test_online_twin_of_a_grown_cache_follows_its_row_table(grown_cache, photo_tars, tmp_path):
    """A grown cache's rows are not image * K + view (padding, a second block): the twin maps them."""
    cached = make_targets(cfg(photo_tars, tmp_path, cache=grown_cache), CPU)
    online = make_targets(cfg(photo_tars, tmp_path, online_teacher=TEACHER, cache=grown_cache, online_views=K), CPU)
    index = FeatureCache.open(grown_cache).read(np.arange(FeatureCache.open(grown_cache).num_views), ["index"])["index"]
    samplers = [t.sampler(4, seed=2, rank=0, world_size=1) for t in (online, cached)]
    for epoch in range(2):
        for rows_online, rows_cached in zip(*(epoch_rows(s, epoch) for s in samplers)):
            assert (np.asarray(rows_online) // K).tolist() == index[rows_cached].tolist()


def test_resume_after_the_cache_grew_continues_with_the_original_command(photo_tars, tmp_path):
    """Issue 22: a run on every view of a K=1 cache (--cache-views 0), interrupted, the cache grown
    to K=2, then resumed with the same command: it keeps K=1 and ends as an uninterrupted run."""
    cache = str(tmp_path / "c.zarr")
    args = extract_args(photo_tars, cache, "--codec", "f32")
    args[args.index("--views-per-image") + 1] = "1"
    assert run_cli(args).exit_code == 0
    config = cfg(photo_tars, tmp_path / "run", cache=cache, checkpoint_every=1, epochs=2)
    Trainer(config).fit(stop_after_steps=4)
    args[args.index("--views-per-image") + 1] = "2"
    assert run_cli(args).exit_code == 0 and FeatureCache.open(cache).meta.view["views_per_image"] == 2
    Trainer(config, resume=True).fit()
    Trainer(cfg(photo_tars, tmp_path / "reference", cache=cache, cache_views=1, epochs=2)).fit()
    assert read_metrics(tmp_path / "run") == pytest.approx(read_metrics(tmp_path / "reference"), abs=1e-6)
    assert json.loads((tmp_path / "run" / "cost.json").read_text())["views"] == 1


def test_fresh_student_masks_over_a_full_view_cache(full_cache, photo_tars, tmp_path):
    fresh = make_targets(cfg(photo_tars, tmp_path, cache=full_cache, student_mask="fresh"), CPU)
    stored = CacheViewDataset(full_cache, [photo_tars])
    rows = fresh.dataset.ok_rows[:6].tolist()
    epochs = [fresh.dataset[EpochRows(rows, e)].ready() for e in range(3)]
    assert all(b.valid.all() for b in epochs)  # full view: L_mse covers every token
    assert all(torch.equal(b.tokens, epochs[0].tokens) and torch.equal(b.images, epochs[0].images) for b in epochs)
    assert all((b.visible.flatten(1).sum(1) == 8).all() for b in epochs)  # the cache's mask ratio 0.5
    assert not torch.equal(epochs[0].visible, epochs[1].visible) and not torch.equal(epochs[1].visible, epochs[2].visible)
    assert not torch.equal(epochs[0].visible, stored[rows].visible)  # not the view's own mask
    assert torch.equal(fresh.dataset[EpochRows(rows, 1)].visible, epochs[1].visible)  # reproducible
    sampler = fresh.sampler(4, seed=0, rank=0, world_size=1)
    sampler.set_epoch(1)
    loader = DataLoader(fresh.dataset, sampler=sampler, batch_size=None, num_workers=1, collate_fn=whole_batch)
    in_worker, direct = next(iter(loader)), fresh.dataset[EpochRows(next(iter(sampler)), 1)]
    assert torch.equal(in_worker.visible, direct.visible)  # the epoch reaches a DataLoader worker
    # the online teacher on full views with fresh masks draws the very same student masks
    online = make_targets(cfg(photo_tars, tmp_path, online_teacher=TEACHER, teacher_view="full", online_views=K,
                              student_mask="fresh"), CPU)
    got = online.complete(online.dataset[EpochRows(rows, 1)])
    assert torch.equal(got.visible, epochs[1].visible) and got.valid.all()
    torch.testing.assert_close(got.tokens, epochs[1].tokens, atol=1e-5, rtol=0)
    run = tmp_path / "run"
    result = invoke(distill_args(full_cache, photo_tars, str(run), "--student-mask", "fresh", "--epochs", "2",
                                 "--batch-size", "12"))
    assert result.exit_code == 0, result.output
    assert len(read_metrics(run)) == 2


def test_fresh_student_mask_is_refused_on_masked_targets(f32_cache, photo_tars, tmp_path):
    result = invoke(distill_args(f32_cache, photo_tars, str(tmp_path / "r"), "--student-mask", "fresh"))
    assert result.exit_code == 2 and one_line(result.output)
    assert result.output.startswith("error: --student-mask fresh") and "--teacher-view full" in result.output
    online = ["run", "--online-teacher", TEACHER, "--img-size", "64", "--student-mask", "fresh",
              *distill_args(f32_cache, photo_tars, str(tmp_path / "o"))[3:]]
    result = invoke(online)
    assert result.exit_code == 2 and one_line(result.output) and "--teacher-view full" in result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_resume_mid_epoch_equals_uninterrupted_and_cost_accumulates(f32_cache, photo_tars, tmp_path):
    def config(out: Path) -> DistillConfig:
        return cfg(photo_tars, out, cache=f32_cache, checkpoint_every=1, epochs=2)
    Trainer(config(tmp_path / "a")).fit()
    Trainer(config(tmp_path / "b")).fit(stop_after_steps=4)  # stops in epoch 1 (3 steps per epoch)
    stopped = json.loads((tmp_path / "b" / "cost.json").read_text())
    assert stopped["steps"] == 4 and stopped["student_images"] == 16
    Trainer(config(tmp_path / "b"), resume=True).fit()
    assert read_metrics(tmp_path / "a") == pytest.approx(read_metrics(tmp_path / "b"), abs=1e-6)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / LAST) for r in "ab")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    costs = [json.loads((tmp_path / r / "cost.json").read_text()) for r in "ab"]
    for cost in costs:
        # 2 image passes = 6 steps of 4; views 0 then 1: all 2 x 12 cached views used once
        assert {k: cost[k] for k in ("steps", "student_images", "teacher_forwards", "views", "method", "targets",
                                     "student_mask", "cache", "cache_views_read")} == {
            "steps": 6, "student_images": 24, "teacher_forwards": 24, "views": K, "method": "hgkd",
            "targets": "cache", "student_mask": "cached", "cache": f32_cache, "cache_views_read": 24}
        assert cost["cache_bytes_read"] == round(24 * cost["cache_bytes_per_view"]) > 0
        assert "estimate" in cost["cache_bytes_read_method"]
    assert costs[1]["wall_s"] > stopped["wall_s"] > 0


def test_cost_counts_distinct_views_and_live_forwards(f32_cache, photo_tars, tmp_path):
    one = Trainer(cfg(photo_tars, tmp_path / "one", cache=f32_cache, cache_views=1, epochs=2, batch_size=12))
    one.fit()
    cost = json.loads((tmp_path / "one" / "cost.json").read_text())
    assert (cost["views"], cost["teacher_forwards"], cost["student_images"]) == (1, N_IMAGES, 2 * N_IMAGES)
    online = Trainer(cfg(photo_tars, tmp_path / "online", online_teacher=TEACHER, epochs=2, batch_size=12))
    online.fit()
    cost = json.loads((tmp_path / "online" / "cost.json").read_text())
    assert cost["targets"] == "online" and cost["views"] == 0 and cost["cache"] is None
    assert cost["student_images"] == 2 * N_IMAGES and cost["cache_bytes_read"] == 0
    # one live forward per student image, plus the queue pre-fill (queue 16 >= the 12 images: one each)
    assert cost["teacher_forwards"] == cost["student_images"] + N_IMAGES
