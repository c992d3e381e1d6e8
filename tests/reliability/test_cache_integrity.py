"""Cache integrity (issue 11): a checksum on every array, lost array metadata named in one line
by every command, a repair that makes the next run re-extract exactly the damaged shards (the
result equal to an uninterrupted cache, file for file), and a full disk while creating the cache."""
from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from hgkd.distill.cli import main as distill_cli
from hgkd.distill.config import DistillConfig
from hgkd.distill.train import Trainer
from hgkd.extract.cli import main as extract_cli
from hgkd.storage.cache import FeatureCache, has_checksum
from hgkd.storage.verify import verify_cache

from cli_results import assert_one_line_error, invoke
from conftest import extract_args, run_cli

TINY = dict(student="resnet18", sparse_backend="masked", batch_size=4, warmup_epochs=0, queue_size=16,
            decoder_width=32, workers=0, log_every=0)


def array_files(cache: Path) -> dict[str, bytes]:
    """Every stored byte of the arrays (metadata and chunks), without completion records."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and p.relative_to(cache).parts[0] not in ("shards", "zarr.json")}


@pytest.fixture(scope="module")
def reference(photo_tars, tmp_path_factory) -> Path:
    """An uninterrupted cache: 24 views in 3 shards of 8."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert run_cli(extract_args(photo_tars, str(out), "--codec", "f32")).exit_code == 0
    return out


def copy_of(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "c.zarr"
    shutil.copytree(reference, out)
    return out


def test_every_array_carries_a_checksum_and_any_flip_in_key_is_caught(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    cache = FeatureCache.open(str(out))
    assert [name for name in cache.arrays if not has_checksum(cache.group[name])] == []
    chunk = out / "key" / "c" / "1"
    original = chunk.read_bytes()
    missed = []
    for pos in range(len(original)):
        damaged = bytearray(original)
        damaged[pos] ^= 0x01
        chunk.write_bytes(bytes(damaged))
        try:
            zarr.open_array(str(out / "key"), mode="r")[8:16]
            missed.append(pos)
        except Exception:
            pass
    chunk.write_bytes(original)
    assert missed == []
    chunk.write_bytes(original[:5] + bytes([original[5] ^ 0x10]) + original[6:])
    problems = verify_cache(str(out)).problems
    assert len(problems) == 1 and problems[0].startswith("shard 1 (rows 8-15): array 'key' is corrupt")


def test_a_cache_made_before_checksums_on_every_array_opens_and_info_says_so(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    group = zarr.open_group(str(out), mode="r+")
    keys = group["key"][:]
    old = group.create_array(name="key", shape=keys.shape, chunks=(8,), dtype=str, compressors="auto", overwrite=True)
    old[:] = keys  # as caches made before issue 11 stored it: zstd without crc32c
    assert not has_checksum(zarr.open_array(str(out / "key"), mode="r"))
    info = invoke(extract_cli, ["info", str(out)])
    assert info.returncode == 0 and "checksums  none on key (made before checksums on every array)" in info.stdout
    verify = invoke(extract_cli, ["verify", str(out)])
    assert verify.returncode == 0 and "note: key stored without crc32c" in verify.stderr
    fresh = invoke(extract_cli, ["info", str(reference)])
    assert "checksums  crc32c on every array" in fresh.stdout


@pytest.fixture(scope="module")
def trained_run(reference, photo_tars, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    Trainer(DistillConfig(cache=str(reference), data=[photo_tars], out=str(run), epochs=1, **TINY)).fit()
    return run


@pytest.mark.parametrize("name", ["tokens", "status", "pooled", "key"])
def test_lost_array_metadata_is_one_line_everywhere_and_repair_restores_it(reference, trained_run, photo_tars,
                                                                          tmp_path, name):
    out = copy_of(reference, tmp_path)
    (out / name / "zarr.json").unlink()
    message = f"{out}: array '{name}' is missing (its zarr.json is gone); the cache is damaged: run 'hgkd-extract repair"
    assert_one_line_error(invoke(extract_cli, ["verify", str(out)]), message)
    assert_one_line_error(invoke(extract_cli, ["info", str(out)]), message)
    assert_one_line_error(invoke(extract_cli, extract_args(photo_tars, str(out), "--codec", "f32")), message)
    run = ["run", "--cache", str(out), "--data", photo_tars, "--out", str(tmp_path / "run"), "--student", "resnet18",
           "--sparse-backend", "masked", "--batch-size", "4", "--epochs", "1", "--workers", "0"]
    assert_one_line_error(invoke(distill_cli, run), message)
    assert_one_line_error(invoke(distill_cli, ["fidelity", str(trained_run), "--cache", str(out), "--data",
                                               photo_tars]), message)
    repaired = invoke(extract_cli, ["repair", str(out)])
    assert repaired.returncode == 0 and f"re-created the metadata of {name}" in repaired.stdout
    assert "nothing to repair" not in repaired.stdout and "cleared" not in repaired.stdout  # the chunks were intact
    assert verify_cache(str(out)).ok and array_files(out) == array_files(reference)


def test_repair_then_run_re_extracts_exactly_the_damaged_shards_bit_for_bit(reference, photo_tars, tmp_path):
    out = copy_of(reference, tmp_path)
    tokens = out / "tokens" / "c" / "0" / "0" / "0"
    raw = bytearray(tokens.read_bytes())
    raw[100] ^= 0xFF
    tokens.write_bytes(bytes(raw))  # shard 0: a flipped byte in the token shard
    (out / "status" / "c" / "2").unlink()  # shard 2: a lost file
    shutil.rmtree(out / "shards" / "000001")  # shard 1: a writer killed after a torn write, before its record
    pooled = out / "pooled" / "c" / "1" / "0"
    pooled.write_bytes(pooled.read_bytes()[:10])
    verify = invoke(extract_cli, ["verify", str(out)])
    assert verify.returncode == 1
    assert f"fix: run 'hgkd-extract repair {out}', then re-run the 'hgkd-extract run' command that made it " \
           "(shards 0, 2 are extracted again)" in verify.stderr
    repaired = invoke(extract_cli, ["repair", str(out)])
    assert repaired.returncode == 0, repaired.stderr
    assert f"cleared shards 0, 1, 2; re-run the 'hgkd-extract run'" in repaired.stdout
    assert not FeatureCache.open(str(out)).is_complete() and FeatureCache.open(str(out)).completed_shards() == set()
    again = invoke(extract_cli, extract_args(photo_tars, str(out), "--codec", "f32"))
    assert again.returncode == 0 and "wrote 24 views in 3 shards" in again.stdout
    assert verify_cache(str(out)).ok
    assert array_files(out) == array_files(reference)
    assert invoke(extract_cli, ["repair", str(out)]).stdout.endswith("nothing to repair\n")


def test_repair_leaves_a_shard_a_live_writer_holds(reference, tmp_path):
    from hgkd.storage.locks import ShardLock

    out = copy_of(reference, tmp_path)
    (out / "status" / "c" / "1").unlink()
    lock = ShardLock(out, 1)
    assert lock.try_acquire()
    try:
        result = invoke(extract_cli, ["repair", str(out)])
    finally:
        lock.release()
    assert "shards 1 are being written by another process" in result.stderr
    assert FeatureCache.open(str(out)).shard_record(1) is not None  # untouched


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # the cache's root metadata is ~2 KiB: EFBIG


def test_full_disk_while_creating_the_cache_is_one_line(photo_tars, tmp_path):
    out = tmp_path / "c.zarr"
    args = extract_args(photo_tars, str(out))
    result = subprocess.run([sys.executable, "-m", "hgkd.extract.cli", *args], capture_output=True, text=True,
                            preexec_fn=_limit_file_size)
    assert_one_line_error(result, f"--out {out}: creating the cache failed")
    assert not FeatureCache.exists(str(out))
    assert run_cli(args).exit_code == 0 and verify_cache(str(out)).ok  # space back: the same command works


def test_resume_over_a_torn_shard_file_rewrites_it(reference, photo_tars, tmp_path):
    """A writer killed mid-shard leaves a torn file and no record: the re-run must not write into it."""
    out = copy_of(reference, tmp_path)
    shutil.rmtree(out / "shards" / "000001")
    torn = out / "tokens" / "c" / "1" / "0" / "0"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 3])
    again = invoke(extract_cli, extract_args(photo_tars, str(out), "--codec", "f32"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "wrote 8 views in 1 shards" in again.stdout and verify_cache(str(out)).ok
    assert array_files(out) == array_files(reference)
