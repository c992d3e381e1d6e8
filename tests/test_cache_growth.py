"""Growing a cache (issue 12): ``--views-per-image`` raised on a complete cache appends views.

Real tars, the tiny real teacher, real Zarr caches on disk. Views are drawn from (seed, key,
view index) and the teacher is deterministic on CPU, so a grown cache must hold exactly the
views of a cache made at once, per (key, view index), whatever its row order.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from hgkd.storage.cache import ATTR, STATUS_MISSING, STATUS_OK, FeatureCache
from hgkd.storage.verify import verify_cache

from conftest import corrupt_jpeg, extract_args, kill_extract_when, run_cli, write_tars

PER_VIEW = ["tokens", "pooled", "valid", "mask", "crop", "flip", "src_hw", "label", "status"]


def grow_args(data: str, out: str, k_views: int, *extra: str) -> list[str]:
    args = extract_args(data, out, "--codec", "f32", *extra)
    args[args.index("--views-per-image") + 1] = str(k_views)
    return args


def by_view(url: str) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Every written row of a cache keyed by (sample key, view index), checking index/view_index."""
    cache = FeatureCache.open(url)
    data = cache.read(range(cache.num_views))
    keys = {key: index for index, key in zip(data["index"], data["key"]) if key}
    rows = {}
    for row in range(cache.num_views):
        if data["status"][row] == STATUS_MISSING:
            continue
        key, view = str(data["key"][row]), int(data["view_index"][row])
        assert data["index"][row] == keys[key], f"row {row}: index does not match its key"
        assert (key, view) not in rows, f"view {key}#{view} stored twice"
        rows[key, view] = {name: data[name][row] for name in PER_VIEW}
    return rows


def assert_same_views(got_url: str, want_url: str) -> None:
    got, want = by_view(got_url), by_view(want_url)
    assert got.keys() == want.keys()
    for view, fields in want.items():
        for name, value in fields.items():
            np.testing.assert_array_equal(got[view][name], value, err_msg=f"{view} {name}")  # bit-equal


def snapshot(url: str) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every file of the cache (arrays, metadata, completion records)."""
    return {str(p.relative_to(url)): (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(url).rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def at_once(photo_tars, tmp_path_factory) -> str:
    """K=4 in one run; 12 samples, shards of 16 views."""
    out = str(tmp_path_factory.mktemp("once") / "k4.zarr")
    assert run_cli(grow_args(photo_tars, out, 4, "--shard-views", "16")).exit_code == 0
    return out


def test_grown_cache_equals_cache_made_at_once_and_keeps_old_shards(photo_tars, at_once, tmp_path):
    out = str(tmp_path / "grown.zarr")
    assert run_cli(grow_args(photo_tars, out, 2, "--shard-views", "16")).exit_code == 0
    before, fingerprint = snapshot(out), FeatureCache.open(out).meta.fingerprint()
    result = run_cli(grow_args(photo_tars, out, 4, "--shard-views", "16"))
    assert result.exit_code == 0, result.output
    assert "grew from 2 to 4 views per image" in result.output and "wrote 24 views in 2 shards" in result.output

    after = snapshot(out)
    changed = {p for p in before if after[p] != before[p]}
    assert changed == {"zarr.json"} | {f"{a}/zarr.json" for a in FeatureCache.open(out).arrays}  # metadata only
    cache = FeatureCache.open(out)
    assert cache.is_complete() and cache.meta.view["views_per_image"] == 4
    # 24 old rows end inside shard 1 (16 views each): rows 24-31 are padding, views 2-3 start at row 32
    assert [(b["views"], b["rows"]) for b in cache.meta.blocks] == [([0, 2], [0, 24]), ([2, 4], [32, 56])]
    assert cache.num_views == 56 and cache.view_rows() == 48 and cache.shard_rows(1) == range(16, 24)
    status = cache.read(range(cache.num_views), ["status"])["status"]
    assert (status[24:32] == STATUS_MISSING).all() and (np.delete(status, range(24, 32)) == STATUS_OK).all()
    assert cache.meta.fingerprint() == fingerprint  # a run started on K=2 still matches
    assert all(cache.shard_record(s)["settings"] == fingerprint for s in range(cache.num_shards))
    report = verify_cache(out)
    assert report.ok and report.views_ok == 48, report.problems
    assert_same_views(out, at_once)

    assert run_cli(grow_args(photo_tars, out, 4, "--shard-views", "16")).exit_code == 0  # same command: no-op
    assert snapshot(out).keys() == after.keys() and verify_cache(out).ok
    info = run_cli(["info", out]).output
    assert "views 0-1 in rows 0-23; views 2-3 in rows 32-55 (grown " in info
    assert "48 teacher forwards spent" in info
    assert json.loads(run_cli(["info", "--json", out]).output)["cost"]["teacher_forwards"] == 48


def test_interrupted_growth_resumes_to_the_same_cache(photo_tars, tmp_path):
    reference = str(tmp_path / "k4.zarr")
    assert run_cli(grow_args(photo_tars, reference, 4, "--shard-views", "4")).exit_code == 0
    out = tmp_path / "grown.zarr"
    assert run_cli(grow_args(photo_tars, str(out), 2, "--shard-views", "4")).exit_code == 0  # shards 0-5
    args = grow_args(photo_tars, str(out), 4, "--shard-views", "4")
    kill_extract_when(args, out / "shards" / "000007")
    partial = FeatureCache.open(str(out))
    assert set(range(6)) < partial.completed_shards() < set(range(12)), "kill must land mid-growth"
    assert not partial.is_complete() and not verify_cache(str(out)).ok
    shrink = run_cli(grow_args(photo_tars, str(out), 2, "--shard-views", "4"))
    assert shrink.exit_code == 2 and "cannot shrink" in shrink.output
    assert run_cli(args).exit_code == 0
    assert verify_cache(str(out)).ok
    assert_same_views(str(out), reference)


def test_growth_killed_between_resize_and_metadata_is_redone(photo_tars, tmp_path):
    """A grower killed after resizing the arrays, before writing the metadata, left a K=2 cache."""
    out = str(tmp_path / "c.zarr")
    assert run_cli(grow_args(photo_tars, out, 2, "--shard-views", "16")).exit_code == 0
    group = zarr.open_group(out, mode="r+")
    for name in FeatureCache.open(out).arrays:
        group[name].resize((56, *group[name].shape[1:]))
    assert verify_cache(out).ok  # still reads as the complete K=2 cache
    assert run_cli(grow_args(photo_tars, out, 4, "--shard-views", "16")).exit_code == 0
    assert FeatureCache.open(out).num_views == 56 and verify_cache(out).ok


def test_cache_made_before_growth_existed_keeps_its_fingerprint(photo_tars, tmp_path):
    out = str(tmp_path / "old.zarr")
    assert run_cli(grow_args(photo_tars, out, 1, "--shard-views", "4")).exit_code == 0
    group = zarr.open_group(out, mode="r+")
    blob = dict(group.attrs[ATTR])
    del blob["blocks"]  # metadata as written before issue 12
    group.attrs[ATTR] = blob
    old = FeatureCache.open(out)
    fingerprint = old.meta.fingerprint()
    assert old.shard_record(0)["settings"] == fingerprint and verify_cache(out).ok
    assert run_cli(grow_args(photo_tars, out, 2, "--shard-views", "4")).exit_code == 0
    grown = FeatureCache.open(out)
    assert grown.meta.fingerprint() == fingerprint and grown.meta.blocks[0] == {"views": [0, 1], "rows": [0, 12],
                                                                               "added": None}
    assert verify_cache(out).ok and verify_cache(out).views_ok == 24


def test_growth_refusals_are_one_line_and_change_nothing(photo_tars, tmp_path):
    out = str(tmp_path / "c.zarr")
    assert run_cli(grow_args(photo_tars, out, 2, "--shard-views", "12")).exit_code == 0
    before = snapshot(out)
    refusals = {  # CliRunner's output holds stderr too: the whole output must be the one error line
        "holds a cache made with other settings (view.mask_ratio: 0.5 != 0.75)": (4, "--mask-ratio", "0.75"),
        "already holds 2 views per image and a cache cannot shrink": (1,),
        "the 5 new views per image do not divide this cache's --shard-views 12": (7,),
    }
    for message, (k_views, *extra) in refusals.items():
        result = run_cli(grow_args(photo_tars, out, k_views, "--shard-views", "12", *extra))
        assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
        assert message in result.output
    assert snapshot(out) == before

    partial = str(tmp_path / "partial.zarr")
    assert run_cli([*grow_args(photo_tars, partial, 2, "--shard-views", "4"), "--world-size", "2"]).exit_code == 0
    unfinished = run_cli(grow_args(photo_tars, partial, 4, "--shard-views", "4"))
    assert unfinished.exit_code == 2 and "not complete at 2 views per image" in unfinished.output


def test_info_counts_teacher_forwards_and_skips_by_reason_across_growth(tmp_path):
    extra = {"img/broken": {"jpg": corrupt_jpeg()}, "img/textonly": {"txt": b"not an image"}}
    data = write_tars(tmp_path / "tars", ["astronaut", "coffee", "rocket"], per_shard=3, extra=extra)
    out = str(tmp_path / "c.zarr")
    for k_views in (1, 2):
        result = run_cli(grow_args(data, out, k_views, "--shard-views", "4"))
        assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    assert sorted(s["key"] for s in cache.meta.skipped) == ["img/broken", "img/textonly"]  # once per sample
    assert verify_cache(out).ok
    info = run_cli(["info", out]).output
    assert "6 teacher forwards spent" in info
    assert "skipped    2 samples: 1 no image member, 1 undecodable image bytes" in info
    cost = cache.cost_summary()
    assert cost["views_skipped"] == 4 and cost["bytes_per_view"] == pytest.approx(cache.nbytes_stored() / 6)
    shutil.rmtree(out)
