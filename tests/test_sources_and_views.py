"""Data sources, view/mask options and stores other than a local directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hgkd.errors import HgkdError
from hgkd.data.sources import open_source
from hgkd.data.demo_data import _load
from hgkd.data.views import ViewConfig, sample_view
from hgkd.storage.cache import STATUS_OK, FeatureCache
from hgkd.storage.verify import verify_cache

from conftest import extract_args, run_cli, run_cli_subprocess


def make_folder(root: Path) -> Path:
    for cls, names in {"cats": ["cat", "chelsea"], "space": ["astronaut", "rocket", "moon"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            Image.fromarray(_load(name)).save(root / cls / f"{name}.png")
    (root / "space" / "notes.txt").write_text("not an image, ignored")
    return root


def test_image_folder_source_orders_keys_and_labels(tmp_path):
    source = open_source([str(make_folder(tmp_path / "imgs"))])
    samples = list(source)
    assert [s.key for s in samples] == ["cats/cat", "cats/chelsea", "space/astronaut", "space/moon", "space/rocket"]
    assert [s.label for s in samples] == [0, 0, 1, 1, 1]
    assert source.num_samples == 5 and len(source.fingerprint()) == 64


def test_extract_from_image_folder_with_full_teacher_view_and_32px_masks(tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = str(tmp_path / "c.zarr")
    result = run_cli(extract_args(str(root), out, "--teacher-view", "full", "--mask-granularity", "32"))
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    data = cache.read(range(cache.num_views), ["mask", "valid", "status", "label"])
    assert (data["status"] == STATUS_OK).all() and data["valid"].all()  # MAE saw the full view
    masks = data["mask"].reshape(-1, 2, 2, 2, 2)  # 2x2 cells of 32 px, each 2x2 patches
    assert (masks == masks[:, :, :1, :, :1]).all()  # each 32-px cell is all hidden or all visible
    assert (data["mask"].sum(1) == 8).all()
    assert verify_cache(out).ok


def test_views_are_deterministic_and_key_dependent():
    cfg = ViewConfig(mask_ratio=0.75, seed=3)
    a, b = sample_view(cfg, "k1", 0, (300, 400)), sample_view(cfg, "k1", 0, (300, 400))
    assert a.crop_tlhw == b.crop_tlhw and a.flip == b.flip and np.array_equal(a.mask_hw, b.mask_hw)
    assert a.mask_hw.sum() == round(0.75 * 196)
    others = [sample_view(cfg, "k1", 1, (300, 400)), sample_view(cfg, "k2", 0, (300, 400))]
    assert all(o.crop_tlhw != a.crop_tlhw or not np.array_equal(o.mask_hw, a.mask_hw) for o in others)
    top, left, h, w = a.crop_tlhw
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400


def test_fsspec_url_store(photo_tars):
    out = "memory://hgkd-test/cache.zarr"
    result = run_cli(extract_args(photo_tars, out))
    assert result.exit_code == 0, result.output
    assert FeatureCache.open(out).is_complete() and FeatureCache.open(out).local_dir is None
    assert verify_cache(out).ok


def test_empty_data_folder_and_unwritable_out_are_clear_errors(photo_tars, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli_subprocess(extract_args(str(empty), str(tmp_path / "c.zarr")))
    assert result.returncode == 2 and "no images" in result.stderr and result.stderr.count("\n") == 1
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; the unwritable-dir case needs a normal user")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_cli_subprocess(extract_args(photo_tars, str(locked / "c.zarr")))
    assert result.returncode == 2 and "--out" in result.stderr


def test_view_config_rejects_bad_options():
    with pytest.raises(HgkdError, match="--mask-ratio"):
        ViewConfig(mask_ratio=1.0)
    with pytest.raises(HgkdError, match="--img-size 200"):
        ViewConfig(img_size=200, mask_granularity=32)
