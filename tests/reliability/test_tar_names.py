"""Tar members whose names are not UTF-8 (issue 11): read, with the undecodable bytes of the key
kept as ``\\xNN`` escapes, by extraction, by a run on that cache and by ``--online-teacher``."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from hgkd.distill.config import DistillConfig
from hgkd.distill.train import Trainer
from hgkd.data.demo_data import SKIMAGE_IMAGES, _jpeg, _load
from hgkd.storage.cache import FeatureCache
from hgkd.storage.verify import verify_cache

from conftest import TINY_TEACHER, extract_args, run_cli

RAW_NAME = b"img/caf\xe9"  # Latin-1 bytes: not UTF-8
TINY = dict(student="resnet18", sparse_backend="masked", batch_size=4, epochs=1, warmup_epochs=0, queue_size=8,
            decoder_width=32, workers=0, log_every=0)


@pytest.fixture(scope="module")
def latin1_tar(tmp_path_factory) -> str:
    """4 real photos, one under a member name that is not UTF-8 (as old tar tools write them)."""
    path = tmp_path_factory.mktemp("latin1") / "part-000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for i, name in enumerate(SKIMAGE_IMAGES[:4]):
            stem = RAW_NAME.decode("utf-8", "surrogateescape") if i == 1 else f"img/{name}"
            for ext, data in (("jpg", _jpeg(_load(name))), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{stem}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert RAW_NAME + b".jpg" in path.read_bytes()  # the raw bytes really are in the tar
    return str(path)


@pytest.fixture(scope="module")
def latin1_cache(latin1_tar, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cache") / "c.zarr")
    result = run_cli(extract_args(latin1_tar, out, "--codec", "f32", "--shard-views", "4"))
    assert result.exit_code == 0, result.output
    return out


def test_non_utf8_member_names_are_extracted_with_their_bytes_kept(latin1_cache):
    cache = FeatureCache.open(latin1_cache)
    keys = list(cache.read(range(cache.num_views), ["key"])["key"])
    assert keys.count("img/caf\\xe9") == 2 and verify_cache(latin1_cache).ok  # both views of it, nothing skipped
    assert "img/caf\\xe9".encode().decode("unicode_escape").encode("latin-1") == RAW_NAME  # the bytes come back


def test_non_utf8_member_names_are_trained_on_from_the_cache_and_online(latin1_tar, latin1_cache, tmp_path):
    Trainer(DistillConfig(cache=latin1_cache, data=[latin1_tar], out=str(tmp_path / "run"), **TINY)).fit()
    Trainer(DistillConfig(online_teacher=TINY_TEACHER, img_size=64, data=[latin1_tar], out=str(tmp_path / "online"),
                          **TINY)).fit()
    assert (Path(tmp_path / "online") / "checkpoints" / "last.pt").is_file()
