"""The persistent sample index (issue 15) on real tars: reused, re-scanned when a tar
changes, never trusted when corrupt, optional where it cannot be written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import webdataset as wds

from hgkd.data import sample_index
from hgkd.data.random_access import open_random_access
from hgkd.data.sources import open_source
from hgkd.errors import HgkdError


def write_tar(path: Path, tag: str, n: int = 5, age_s: int = 3600) -> None:
    """``n`` samples whose image bytes name the tar's ``tag`` and the sample (equal sizes per tag
    length); modified ``age_s`` ago (a tar written in the last 2 s is scanned but not kept)."""
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"{tag}/s{i:03d}", "jpg": f"image {tag} {i:03d} ".encode() * 7, "cls": str(i % 3)})
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - age_s * 10**9))


@pytest.fixture
def tars(tmp_path) -> str:
    for t in range(3):
        write_tar(tmp_path / f"shard-{t}.tar", f"t{t}")
    return str(tmp_path / "shard-{0..2}.tar")


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """URLs scanned by ``sample_index.scan_tar`` (the real function still runs)."""
    seen: list[str] = []
    real = sample_index.scan_tar

    def counting(url: str, stamp: list):
        seen.append(url)
        return real(url, stamp)

    monkeypatch.setattr(sample_index, "scan_tar", counting)
    return seen


def expected(spec: str) -> list[tuple[str, bytes, int]]:
    """What webdataset's own sequential reader yields: (key, image bytes, label)."""
    return [(s.key, s.data, s.label) for s in open_source(spec)]


def contents(source) -> list[tuple[str, bytes, int]]:
    return [(source.keys[i], source.read(i), source.labels[i]) for i in range(len(source.keys))]


def test_second_open_reads_the_index_and_scans_nothing(tars, scans, tmp_path):
    index = tmp_path / "index"
    first = open_random_access(tars, index)
    assert len(scans) == 3 and len(list(index.glob("*.npz"))) == 1
    second = open_random_access(tars, index)
    assert len(scans) == 3, "the second open must read the index, not scan"
    assert contents(first) == contents(second) == expected(tars)
    assert second.source.num_samples == 15


def test_a_tar_rewritten_with_the_same_size_is_scanned_again(tars, scans, tmp_path):
    index = tmp_path / "index"
    open_random_access(tars, index)
    target = tmp_path / "shard-1.tar"
    size = target.stat().st_size
    write_tar(target, "u1", age_s=1800)  # same member sizes and names' lengths: same tar size, other keys and bytes
    assert target.stat().st_size == size
    scans.clear()
    again = open_random_access(tars, index)
    assert scans == [str(target)]
    assert contents(again) == expected(tars) and any(k.startswith("u1/") for k in again.keys)
    scans.clear()
    open_random_access(tars, index)
    assert scans == [], "the rewritten index holds the re-scanned tar"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "one-key-byte"])
def test_a_corrupt_index_is_ignored_and_rewritten(tars, scans, tmp_path, damage):
    index = tmp_path / "index"
    open_random_access(tars, index)
    (path,) = index.glob("*.npz")
    blob = path.read_bytes()
    assert blob.count(b"t1/s002") == 1
    path.write_bytes({"truncate": blob[: len(blob) // 2], "garbage": blob[:100] + b"\x00" * (len(blob) - 100),
                      "empty": b"", "one-key-byte": blob.replace(b"t1/s002", b"t1/s00X")}[damage])
    scans.clear()
    source = open_random_access(tars, index)
    assert len(scans) == 3 and contents(source) == expected(tars)
    scans.clear()
    open_random_access(tars, index)
    assert scans == [], "the damaged file was replaced by a whole index"


def test_an_unwritable_index_place_costs_only_the_persistence(tars, scans, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    source = open_random_access(tars, blocker / "index")  # cannot be created (root-proof, unlike chmod)
    assert contents(source) == expected(tars) and len(scans) == 3
    assert not list(tmp_path.glob("**/*.npz")) and not list(tmp_path.glob("**/*.tmp"))


def test_no_temporary_files_are_left_and_off_keeps_nothing(tars, tmp_path, monkeypatch):
    index = tmp_path / "index"
    open_random_access(tars, index)
    assert [p.suffix for p in index.iterdir()] == [".npz"]
    monkeypatch.setenv("HGKD_SAMPLE_INDEX", "off")
    assert sample_index.index_dir() is None
    monkeypatch.setenv("HGKD_SAMPLE_INDEX", str(tmp_path / "env-index"))
    open_random_access(tars)
    assert len(list((tmp_path / "env-index").glob("*.npz"))) == 1


def test_a_tar_changed_after_indexing_is_refused_not_misread(tars, tmp_path):
    source = open_random_access(tars, tmp_path / "index")
    assert source.read(0) is not None
    write_tar(tmp_path / "shard-2.tar", "zz")
    st = (tmp_path / "shard-2.tar").stat()
    os.utime(tmp_path / "shard-2.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(HgkdError, match=r"shard-2\.tar changed since this run indexed it"):
        source.read(12)


def test_a_broken_tar_is_one_line(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(HgkdError, match=r"bad\.tar: cannot read this tar shard"):
        open_random_access(str(tmp_path / "bad.tar"), tmp_path / "index")
    assert not (tmp_path / "index").exists()


def write_folder(root: Path) -> None:
    """Two classes of three images; directory times an hour back (a listing of a folder that
    changed in the last seconds is not reused: coarse file-system clocks)."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(f"{cls}{i}".encode() * 10)
    for folder in (root, root / "a", root / "b"):
        os.utime(folder, ns=(folder.stat().st_atime_ns, folder.stat().st_mtime_ns - 3600 * 10**9))


def test_a_folder_listing_is_kept_until_a_directory_changes(tmp_path, monkeypatch):
    root, index = tmp_path / "images", tmp_path / "index"
    write_folder(root)
    walks: list[str] = []
    real = sample_index.walk_images
    monkeypatch.setattr(sample_index, "walk_images", lambda r: walks.append(r) or real(r))
    first = open_random_access(str(root), index)
    assert open_source(str(root)).entries == first.source.entries and len(walks) == 1
    second = open_random_access(str(root), index)
    assert len(walks) == 1, "the kept listing is reused"
    assert contents(second) == contents(first) == expected(str(root))
    (root / "b" / "9.jpg").write_bytes(b"new image")
    third = open_random_access(str(root), index)
    assert len(walks) == 2 and third.source.num_samples == 7 and contents(third) == expected(str(root))
    open_random_access(str(root), index)
    assert len(walks) == 3, "a directory changed seconds before the listing: listed again"
    running = open_random_access(str(root), index)
    (root / "a" / "0.jpg").write_bytes(b"rewritten in place, another size")  # no directory time changes
    with pytest.raises(HgkdError, match=r"0\.jpg changed since its folder was listed"):
        running.read(0)


def test_a_tar_written_seconds_ago_is_scanned_but_not_kept(tmp_path, scans):
    write_tar(tmp_path / "old.tar", "o")
    write_tar(tmp_path / "new.tar", "n", age_s=0)  # a coarse clock could hide its next rewrite
    spec = [str(tmp_path / "old.tar"), str(tmp_path / "new.tar")]
    open_random_access(spec, tmp_path / "index")
    scans.clear()
    assert contents(open_random_access(spec, tmp_path / "index"))[-1][0] == "n/s004"
    assert scans == [str(tmp_path / "new.tar")]
