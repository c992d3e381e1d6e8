"""Files named by local path or fsspec URL (``http://``, ``s3://``, ``memory://``, ...).

One home for what data sources and the cache reader both need: telling a URL from a path,
a file's *stamp* (what identifies this version of it: size and modification time, or size
and the store's ETag), and ranged reads. Local files keep using ``os`` directly; a URL is
read through a synchronous fsspec filesystem made once per process (DataLoader workers
fork: fsspec's instance cache starts afresh in a new process).
"""
from __future__ import annotations

import os
from typing import Any

from .errors import HgkdError

# Fields fsspec filesystems report that change when an object is rewritten, best first.
_VERSION_FIELDS = ("ETag", "etag", "Last-Modified", "LastModified", "last_modified", "mtime", "updated",
                   "generation", "created")


def is_url(path: str) -> bool:
    """Read through fsspec (``file://`` too: a URL is never taken for a local path)."""
    return "://" in path


def url_fs(url: str, **storage_options: Any) -> tuple[Any, str]:
    """(synchronous fsspec filesystem, path inside it) of ``url``; one line when fsspec cannot."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as err:
        raise HgkdError(f"{url}: no fsspec filesystem for this URL ({type(err).__name__}: {err}); "
                        f"install the fsspec backend for it (e.g. s3fs, gcsfs, aiohttp)") from None


def remote_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning 'the store did not answer or has no such object' (network, HTTP status)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def stamp(path: str) -> list:
    """What identifies this version of a file: ``[size, mtime_ns, inode]`` locally, ``[size,
    version]`` for a URL (the store's ETag or modification time when it reports one)."""
    if not is_url(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns, st.st_ino]
    fs, inner = url_fs(path)
    try:
        info = fs.info(inner)
    except remote_errors() as err:
        raise HgkdError(f"{path}: cannot reach it ({type(err).__name__}: {err}); check the URL and the network") \
            from None
    if info.get("type") == "directory":
        raise HgkdError(f"{path}: a directory, not a file")
    version = next((str(info[f]) for f in _VERSION_FIELDS if info.get(f) is not None), "")
    return [int(info.get("size") or -1), version]


class RangeReader:
    """Ranged reads of URLs through fsspec, filesystems kept per process."""

    def __init__(self) -> None:
        self._fs: dict[str, tuple[Any, str]] = {}
        self._pid = os.getpid()

    def _resolve(self, url: str) -> tuple[Any, str]:
        if self._pid != os.getpid():
            self._fs, self._pid = {}, os.getpid()
        hit = self._fs.get(url)
        if hit is None:
            hit = self._fs[url] = url_fs(url)
        return hit

    def read(self, url: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (``size < 0``: the whole file); one line when unreachable."""
        fs, inner = self._resolve(url)
        try:
            if size < 0:
                return fs.cat_file(inner)
            return fs.cat_file(inner, start=offset, end=offset + size)
        except remote_errors() as err:
            raise HgkdError(f"{url}: cannot read bytes {offset}-{offset + size - 1} ({type(err).__name__}: "
                            f"{err}); check the URL and the network") from None

    def read_many(self, url: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, size)`` ranges of one file, fetched concurrently where the store can."""
        fs, inner = self._resolve(url)
        try:
            return fs.cat_ranges([inner] * len(ranges), [o for o, _ in ranges], [o + n for o, n in ranges],
                                 on_error="raise")
        except remote_errors() as err:
            raise HgkdError(f"{url}: cannot read {len(ranges)} ranges ({type(err).__name__}: {err}); "
                            f"check the URL and the network") from None

    def __getstate__(self) -> dict:
        return {"_fs": {}, "_pid": -1}
