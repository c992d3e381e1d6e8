"""Source images in a fixed order: webdataset tar shards or an ImageFolder-style directory.

A source yields raw, undecoded samples ``(index, key, bytes, label)`` so that resuming or
skipping another writer's shard costs no decoding. Tar shards are read with webdataset's
own tar iterator (its grouping of members into samples), folders in sorted path order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import webdataset as wds
from webdataset.tariterators import tarfile_samples

from ..errors import HgkdError
from ..remote import is_url, stamp

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
LABEL_EXTS = ("cls", "cls.txt", "label", "target")


@dataclass
class Sample:
    index: int
    key: str
    data: bytes | None  # None when the sample has no image member
    label: int = -1


@dataclass
class DataSource:
    """An ordered, countable set of samples with a fingerprint of what it was made from."""

    kind: str  # "webdataset" or "folder"
    spec: list[str]
    entries: list[tuple[str, int]] = field(default_factory=list)  # (path or url, size in bytes)
    num_samples: int = 0  # 0 until counted (``open_source(count=False)``: the sample index counts)
    stamps: list[list] | None = None  # per tar: what identifies its version (``remote.stamp``)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.entries).encode()).hexdigest()

    def describe(self) -> dict:
        listed = self.entries if self.kind == "webdataset" else []  # folders: too many to list
        return {"kind": self.kind, "spec": self.spec, "fingerprint": self.fingerprint(),
                "num_samples": self.num_samples, "shards": [list(e) for e in listed]}

    def __iter__(self) -> Iterator[Sample]:
        if self.kind == "folder":
            yield from _iter_folder(self)
        else:
            yield from _iter_tars(self)


FolderLister = Callable[[str], list[tuple[str, int]]]  # root -> (relative path, size) entries, sorted


def open_source(spec: list[str] | str, count: bool = True, folder_lister: FolderLister | None = None) -> DataSource:
    """Resolve ``--data`` (tar patterns with braces, URLs, one image folder, or one folder of
    tar shards) and count it. ``count=False``: tars are not read; each is stamped instead
    (a URL through fsspec: size and version), for :mod:`hgkd.data.sample_index` to count, and an
    image folder is listed by ``folder_lister`` (``random_access.open_indexed`` passes the sample
    index's kept listing; default: a fresh walk)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs or not all(s.strip() for s in specs):
        raise HgkdError("--data is empty; give tar shards ('train-{000..009}.tar') or an image folder")
    if len(specs) == 1 and Path(specs[0]).is_dir():
        return _open_folder(specs[0], count, folder_lister)
    return _open_tars(specs, [u for s in specs for u in wds.shardlists.expand_urls(s)], count)


def _open_tars(specs: list[str], urls: list[str], count: bool = True) -> DataSource:
    entries, stamps = [], []
    for url in urls:
        if not is_url(url) and not Path(url).is_file():
            raise HgkdError(f"--data: {url} does not exist (from {' '.join(specs)})")
        if count:  # extraction streams URLs with webdataset: their size is not needed
            entries.append((url, -1 if is_url(url) else os.path.getsize(url)))
            continue
        stamps.append(stamp(url))
        if stamps[-1][0] < 0:
            raise HgkdError(f"--data {url}: the store does not report its size; stage two needs ranged reads")
        entries.append((url, stamps[-1][0]))
    source = DataSource("webdataset", specs, entries, stamps=None if count else stamps)
    if not count:
        return source
    with_image = 0
    for sample in _iter_tars(source, count_only=True):
        source.num_samples = sample.index + 1
        with_image += sample.data is not None
    check_counted(source, with_image)
    return source


def check_counted(source: DataSource, with_image: int) -> None:
    """Refuse tar shards without samples, or without a single image member."""
    if source.num_samples == 0:
        raise HgkdError(f"--data {' '.join(source.spec)}: no samples found in {len(source.entries)} tar file(s)")
    if with_image == 0:
        raise HgkdError(f"--data {' '.join(source.spec)}: none of the {source.num_samples} samples has an image "
                        f"member ({', '.join(IMAGE_EXTS)}); point --data at image shards")


def _open_folder(root: str, count: bool = True, folder_lister: FolderLister | None = None) -> DataSource:
    """An image folder (``root/class/img.jpg``), or a folder holding only ``.tar`` shards.
    ``count=False``: listed by ``folder_lister`` (the sample index keeps listings, issue 15)."""
    entries = folder_lister(root) if (folder_lister is not None and not count) else walk_images(root)[0]
    if not entries:
        shards = sorted(str(p) for p in Path(root).glob("*.tar") if p.is_file())
        if shards:
            return _open_tars([root], shards, count)
        raise HgkdError(f"--data {root}: no images ({', '.join(IMAGE_EXTS)}) and no .tar shards found in this "
                        "folder; give an image folder (root/class/img.jpg) or tar shards as a brace pattern, "
                        "e.g. 'shards/train-{0000..0009}.tar'")
    return DataSource("folder", [str(root)], entries, len(entries))


def walk_images(root: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """An image folder's (relative path, size) entries in sorted path order, and the
    modification time (ns) of every directory under it (``"."``: the root)."""
    files, dirs = [], {}
    for top, subdirs, names in os.walk(root):
        subdirs.sort()
        dirs[os.path.relpath(top, root)] = os.stat(top).st_mtime_ns
        for name in names:
            path = os.path.join(top, name)
            if Path(name).suffix.lower().lstrip(".") in IMAGE_EXTS and os.path.isfile(path):
                files.append((os.path.relpath(path, root), os.path.getsize(path)))
    files.sort(key=lambda entry: Path(entry[0]).parts)
    return files, dirs


def _iter_folder(source: DataSource) -> Iterator[Sample]:
    root = Path(source.spec[0])
    relpaths = [rel for rel, _ in source.entries]
    for index, (rel, label) in enumerate(zip(relpaths, folder_labels(relpaths))):
        yield Sample(index, text_key(str(Path(rel).with_suffix(""))), (root / rel).read_bytes(), label)


def _iter_tars(source: DataSource, count_only: bool = False) -> Iterator[Sample]:
    shards = ({"url": url} for url, _ in source.entries)
    for index, sample in enumerate(tarfile_samples(shards, handler=_reraise_as_user_error)):
        key = text_key(sample["__key__"])
        if count_only:  # data: b"" when the sample has an image member, else None
            yield Sample(index, key, b"" if any(ext in sample for ext in IMAGE_EXTS) else None)
            continue
        image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
        yield Sample(index, key, image, _label_of(sample))


def same_data(source: DataSource, recorded: dict) -> bool:
    """Whether ``source`` is the data set a cache recorded (``CacheMeta.dataset``): the same
    fingerprint, or the same tar shards moved elsewhere (e.g. copied to an object store):
    equal file names in the same order and equal sizes (a recorded size of -1: unknown)."""
    if source.fingerprint() == recorded.get("fingerprint"):
        return True
    shards = recorded.get("shards") or []
    if source.kind != "webdataset" or not shards or len(shards) != len(source.entries):
        return False
    name = lambda path: str(path).rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
    return all(name(url) == name(old) and (old_size < 0 or size == old_size)
               for (url, size), (old, old_size) in zip(source.entries, shards))


def text_key(key: str) -> str:
    """A sample key as UTF-8 text (issue 11). A member name that is not UTF-8 reaches us with
    surrogate escapes (tarfile, os); its undecodable bytes are kept as ``\\xNN``, so the key
    still names the member's bytes and can be hashed and stored."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _label_of(sample: dict) -> int:
    return parse_label(next((sample[ext] for ext in LABEL_EXTS if ext in sample), None))


def parse_label(data: bytes | None) -> int:
    """A label member's integer class (``.cls``, ``.label``, ...); -1 when absent or not an integer."""
    try:
        return int(data.decode().strip()) if data is not None else -1
    except ValueError:
        return -1


def folder_labels(relpaths: list[str]) -> list[int]:
    """Class index = sorted position of the first sub-folder (``root/class/img.jpg``); -1 at the root."""
    classes = sorted({Path(rel).parts[0] for rel in relpaths if len(Path(rel).parts) > 1})
    ids = {name: i for i, name in enumerate(classes)}
    return [ids[Path(rel).parts[0]] if len(Path(rel).parts) > 1 else -1 for rel in relpaths]


def _reraise_as_user_error(exn: Exception) -> bool:
    raise HgkdError(f"--data: cannot read tar shard ({type(exn).__name__}: {exn}); is it a complete tar file?")
