"""A persistent index of tar shards' samples: image member offsets, keys and labels.

Scanning every tar header costs a pass over each shard's headers (on a shared or remote
file system, one request per member); stage two needs it on every run and every resume.
The index is scanned once per tar and kept in one file per data set:
``<dir>/<sha256 of the tar list>.npz`` (numpy arrays, no pickle). Each tar's part carries
the tar's *stamp* (size, modification time, inode; for a URL size and ETag/modification
time): a tar whose stamp differs is scanned again, never read at stale offsets (a tar
written in the last 2 s is not kept: a coarse clock could hide its next change). A file that
does not load (truncated, corrupt, another format) is ignored and rewritten. Writes go to a
temporary file renamed into place, so a reader never sees half an index, and concurrent
writers (DDP ranks, nodes) each leave a whole one.

Image folders are listed once the same way (``list_folder``): the listing is kept with the
modification time of every directory in it, and reused while none changed (a file added,
removed or renamed changes its directory's time; a file rewritten in place does not, so the
reader checks each file's size on read).

The directory is ``$HGKD_SAMPLE_INDEX`` if set (``off``: no persistence), else
``$XDG_CACHE_HOME/hgkd/sample-index`` (``~/.cache/...``). One that cannot be written
(read-only file system) only costs the persistence: the scan is used and not kept.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix

from ..errors import HgkdError
from ..remote import is_url, remote_errors, retry_sync, url_fs
from .sources import IMAGE_EXTS, LABEL_EXTS, parse_label, text_key, walk_images

log = logging.getLogger(__name__)

FORMAT = "hgkd-sample-index/1"
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default


@dataclass
class TarIndex:
    """One tar's samples, in webdataset's grouping and order."""

    url: str
    stamp: list
    offsets: np.ndarray  # (samples,) int64 image member data offset, -1: no image member
    sizes: np.ndarray  # (samples,) int64 image member size
    labels: np.ndarray  # (samples,) int64 class, -1 when absent
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def index_dir() -> Path | None:
    """Where indexes live (None: ``HGKD_SAMPLE_INDEX=off``)."""
    explicit = os.environ.get("HGKD_SAMPLE_INDEX")
    if explicit is not None:
        return None if explicit.strip().lower() in ("", "off", "none", "0") else Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hgkd" / "sample-index"


def index_path(directory: Path, urls: list[str]) -> Path:
    return directory / (hashlib.sha256(json.dumps(urls).encode()).hexdigest() + ".npz")


def _open_tar(url: str, stack: ExitStack) -> tarfile.TarFile:
    """A local tar, or a URL's through fsspec (1 MiB read-ahead: headers of small members)."""
    if not is_url(url):
        return stack.enter_context(tarfile.open(url, mode="r:"))
    fs, inner = url_fs(url)
    raw = stack.enter_context(fs.open(inner, "rb", block_size=1 << 20))
    return stack.enter_context(tarfile.open(fileobj=raw, mode="r:"))


def scan_tar(url: str, stamp: list) -> TarIndex:
    """Read one tar's headers (and its small label members): the samples webdataset would yield."""
    def members() -> Iterator[dict]:
        with ExitStack() as stack:
            tar = _open_tar(url, stack)
            for info in tar:
                name = info.name
                if not info.isreg() or ("/" not in name and name.startswith(meta_prefix)
                                        and name.endswith(meta_suffix)) or _SKIP_META.match(name):
                    continue
                is_label = name.rsplit(".", 1)[-1].lower() in LABEL_EXTS or name.endswith(".cls.txt")
                data = tar.extractfile(info).read() if is_label else (info.offset_data, info.size)
                yield {"fname": name, "data": data, "__url__": url}
        yield {}

    offsets, sizes, labels, keys = [], [], [], []

    def scan() -> None:  # again from the start after a transient remote fault (issue 21)
        for values in (offsets, sizes, labels, keys):
            values.clear()
        for sample in group_by_keys(members()):
            image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
            offsets.append(image[0] if image is not None else -1)
            sizes.append(image[1] if image is not None else 0)
            keys.append(text_key(sample["__key__"]))
            labels.append(parse_label(next((sample[ext] for ext in LABEL_EXTS if ext in sample), None)))

    try:
        retry_sync(scan, url) if is_url(url) else scan()
    except (tarfile.TarError, EOFError, ValueError) as err:
        raise HgkdError(f"--data {url}: cannot read this tar shard ({type(err).__name__}: {err}); "
                        f"is it a complete tar file?") from None
    except remote_errors() as err:
        raise HgkdError(f"--data {url}: cannot read it ({type(err).__name__}: {err}); "
                        f"check the URL and the network") from None
    return TarIndex(url, stamp, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
                    np.asarray(labels, np.int64), keys)


def load(path: Path) -> dict[str, TarIndex]:
    """The tars held by an index file, by URL; {} when it is missing or does not load."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ("meta", "offsets", "sizes", "labels", "keys")}
        meta = json.loads(arrays["meta"].tobytes())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        keys = arrays["keys"].tobytes().decode("utf-8").split("\0") if len(arrays["keys"]) else []
        counts = [int(t["samples"]) for t in meta["tars"]]
        if not (sum(counts) == len(keys) == len(arrays["offsets"]) == len(arrays["sizes"]) == len(arrays["labels"])):
            raise ValueError("array lengths disagree")
    except FileNotFoundError:
        return {}
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        log.warning("sample index %s does not load (%s: %s); scanning the tars again", path, type(err).__name__, err)
        return {}
    out, start = {}, 0
    for tar, n in zip(meta["tars"], counts):
        part = slice(start, start + n)
        out[tar["url"]] = TarIndex(tar["url"], tar["stamp"], arrays["offsets"][part], arrays["sizes"][part],
                                   arrays["labels"][part], keys[part])
        start += n
    return out


def save(path: Path, tars: list[TarIndex]) -> bool:
    """Write atomically (temporary file, then rename); False when the place is not writable."""
    keys = [k for t in tars for k in t.keys]
    meta = {"format": FORMAT, "tars": [{"url": t.url, "stamp": t.stamp, "samples": len(t)} for t in tars]}
    buf = io.BytesIO()
    empty = np.zeros(0, np.int64)
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             offsets=np.concatenate([t.offsets for t in tars]) if tars else empty,
             sizes=np.concatenate([t.sizes for t in tars]) if tars else empty,
             labels=np.concatenate([t.labels for t in tars]) if tars else empty,
             keys=np.frombuffer("\0".join(keys).encode("utf-8"), np.uint8))
    return _write_atomic(path, buf.getvalue())


def _write_atomic(path: Path, blob: bytes) -> bool:
    """Temporary file in the same folder, then rename; False (logged) when not writable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as err:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        log.info("sample index not kept: %s is not writable (%s)", path.parent, err)
        return False


def index_tars(urls: list[str], stamps: list[list], directory: Path | None | str = "default") -> list[TarIndex]:
    """Every tar's index: from the index file where its stamp still matches, else scanned (and
    the file rewritten). ``directory``: where the file lives (``"default"``: :func:`index_dir`)."""
    where = index_dir() if directory == "default" else (Path(directory) if directory is not None else None)
    path = index_path(where, urls) if where is not None else None
    kept = load(path) if path is not None else {}
    tars, scanned = [], 0
    for url, stamp in zip(urls, stamps):
        hit = kept.get(url)
        if hit is None or list(hit.stamp) != list(stamp):
            if hit is not None:
                log.info("%s changed since it was indexed (stamp %s -> %s); scanning it again", url, hit.stamp, stamp)
            hit = scan_tar(url, stamp)
            scanned += 1
        tars.append(hit)
    if path is not None and (scanned or len(kept) != len(urls)):
        save(path, [t for t in tars if not _racy(t.stamp)])
    return tars


def _racy(stamp: list) -> bool:
    """A local tar modified in the last 2 s may change again unseen by a coarse file-system
    clock (same size, same mtime): its scan is used but not kept."""
    return len(stamp) == 3 and stamp[1] > time.time_ns() - 2 * 10**9



def list_folder(root: str, directory: Path | None | str = "default") -> list[tuple[str, int]]:
    """An image folder's (relative path, size) entries in ``open_source``'s order, from the kept
    listing while every directory's modification time is unchanged, else listed (and kept)."""
    where = index_dir() if directory == "default" else (Path(directory) if directory is not None else None)
    path = where / ("folder-" + hashlib.sha256(os.path.abspath(root).encode()).hexdigest() + ".json") \
        if where is not None else None
    if path is not None:
        try:
            kept = json.loads(path.read_text())
            # a directory changed within 2 s before the listing may change again unseen on a
            # file system with coarse timestamps ("racy" listing): such a listing is not reused
            settled = max(kept["dirs"].values()) < kept["listed_ns"] - 2 * 10**9
            if kept.get("format") == FORMAT and settled and all(
                    os.stat(os.path.join(root, d)).st_mtime_ns == t for d, t in kept["dirs"].items()):
                return [(rel, int(size)) for rel, size in kept["files"]]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("folder listing %s does not load (%s: %s); listing %s again", path, type(err).__name__,
                        err, root)
    listed_ns = time.time_ns()
    files, dirs = walk_images(root)
    if path is not None:
        _write_atomic(path, json.dumps({"format": FORMAT, "root": os.path.abspath(root), "dirs": dirs,
                                        "listed_ns": listed_ns, "files": files}).encode())
    return files
