"""Damaged cache metadata (issue 21): one flipped byte, a truncation or non-UTF-8 bytes in the
root ``zarr.json``, an array's ``zarr.json``, the ``shards`` group's or a shard's completion
record is one line from ``verify``, ``info``, ``run`` and ``hgkd-distill run`` (never a
traceback), and ``repair`` treats it exactly as a deleted file: it re-creates what it can
re-create (array and group metadata: the cache is then equal to the original, file for file)
and clears a shard whose record is damaged, which the next ``run`` extracts again (equal to the
original). The root's settings exist nowhere else: every command says to extract again."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hgkd.data.demo_data import SKIMAGE_IMAGES
from hgkd.distill.cli import main as distill_cli
from hgkd.extract.cli import main as extract_cli
from hgkd.storage.verify import verify_cache

from cli_results import assert_one_line_error, invoke
from conftest import extract_args, run_cli, write_tars

ROOT, TOKENS, STATUS, GROUP, RECORD = "zarr.json", "tokens/zarr.json", "status/zarr.json", "shards/zarr.json", \
    "shards/000001/zarr.json"
COMMANDS = ("verify", "info", "repair", "run", "distill")


def damage(path: Path, kind: str) -> None:
    raw = path.read_bytes()
    if kind == "flip":  # one bit of a ':' after the middle: still ASCII, no longer JSON
        at = raw.index(b'":', len(raw) // 2) + 1
        raw = raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]
    elif kind == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # non-UTF-8 byte in the middle
        raw = raw[: len(raw) // 2] + b"\xff" + raw[len(raw) // 2 + 1:]
    path.write_bytes(raw)


def every_file(cache: Path, records: bool = True) -> dict[str, bytes]:
    """Every stored byte; ``records=False`` leaves out the completion records and the root
    metadata (a re-extracted shard's record holds its writer and time)."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and (records or p.relative_to(cache).parts[0] not in ("shards", "zarr.json"))}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, str]:
    """One tiny cache (4 images x 2 views in 2 shards) and its data; each case damages a copy."""
    base = tmp_path_factory.mktemp("damage")
    tars = write_tars(base / "tars", list(SKIMAGE_IMAGES[:4]), per_shard=2)
    out = base / "ref.zarr"
    assert run_cli(extract_args(tars, str(out), *EXTRACT)).exit_code == 0
    return out, tars


EXTRACT = ("--codec", "f32", "--shard-views", "4", "--workers", "0")


def command(name: str, cache: Path, tars: str, tmp_path: Path):
    if name == "distill":
        return invoke(distill_cli, ["run", "--cache", str(cache), "--data", tars, "--out", str(tmp_path / "run"),
                                    "--student", "resnet18", "--sparse-backend", "masked", "--batch-size", "4",
                                    "--epochs", "1", "--warmup-epochs", "0", "--queue-size", "16",
                                    "--decoder-width", "32", "--workers", "0"])
    if name == "run":
        return invoke(extract_cli, extract_args(tars, str(cache), *EXTRACT))
    return invoke(extract_cli, [name, str(cache)])


@pytest.mark.parametrize("kind", ["flip", "truncate", "non-utf8"])
@pytest.mark.parametrize("name", COMMANDS)
def test_damaged_root_metadata_is_one_line_saying_extract_again(made, tmp_path, name, kind):
    reference, tars = made
    cache = tmp_path / "c.zarr"
    shutil.copytree(reference, cache)
    damage(cache / ROOT, kind)
    result = command(name, cache, tars, tmp_path)
    assert_one_line_error(result, f"{cache}/zarr.json: the cache's own metadata is damaged (")
    assert f"cannot be repaired: delete {cache} and re-run the 'hgkd-extract run' command" in result.stderr


@pytest.mark.parametrize("kind", ["flip", "truncate", "non-utf8"])
@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("file", [TOKENS, STATUS, GROUP])
def test_damaged_array_or_group_metadata_is_one_line_and_repair_rebuilds_it(made, tmp_path, file, name, kind):
    reference, tars = made
    cache = tmp_path / "c.zarr"
    shutil.copytree(reference, cache)
    damage(cache / file, kind)
    result = command(name, cache, tars, tmp_path)
    node = file.split("/")[0]
    if name != "repair":
        what = "the shard records' group 'shards'" if node == "shards" else f"array '{node}'"
        assert_one_line_error(result, f"{cache}: {what} has damaged metadata ({file}: ")
        assert f"the cache is damaged: run 'hgkd-extract repair {cache}'" in result.stderr
        return
    assert result.returncode == 0 and f"re-created the metadata of {node}" in result.stdout, result.stderr[-2000:]
    assert "cleared" not in result.stdout  # the chunks and records were intact
    assert verify_cache(str(cache)).ok and every_file(cache) == every_file(reference)


@pytest.mark.parametrize("kind", ["flip", "truncate", "non-utf8"])
@pytest.mark.parametrize("name", COMMANDS)
def test_damaged_shard_record_is_an_unfinished_shard(made, tmp_path, name, kind):
    """As a deleted record: verify names it, info counts the shard as pending, run (or repair, then
    run) extracts it again, equal to the original; distillation refuses the unfinished shard."""
    reference, tars = made
    cache = tmp_path / "c.zarr"
    shutil.copytree(reference, cache)
    damage(cache / RECORD, kind)
    result = command(name, cache, tars, tmp_path)
    if name == "distill":
        assert_one_line_error(result, f"{cache}: shard 1 (rows 4-7) has no completion record")
        return
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if name == "verify":
        assert result.returncode == 1
        assert "problem: shard 1 (rows 4-7): completion record shards/000001/zarr.json is damaged (" in result.stderr
        assert f"fix: run 'hgkd-extract repair {cache}'" in result.stderr
        return
    if name == "info":
        assert result.returncode == 0 and "; 1/2 shards)" in result.stdout
        return
    if name == "repair":
        assert result.returncode == 0 and "cleared shards 1;" in result.stdout
        result = command("run", cache, tars, tmp_path)
    assert result.returncode == 0 and "wrote 4 views in 1 shards" in result.stdout, result.stderr[-2000:]
    assert verify_cache(str(cache)).ok and every_file(cache, records=False) == every_file(reference, records=False)
