"""Byte access to a cache's shard files for :class:`storage.reader.ShardReader`.

``LocalFiles``: descriptors read with ``os.pread`` (the fast path, unchanged by fsspec).
``FsspecFiles``: the same four calls over an fsspec filesystem - a "handle" is the file's path
and size, reads are ranged requests (``cat_file``), a batch of ranges one ``cat_ranges`` call
(concurrent on async stores such as HTTP or S3).
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import HgkdError
from ..remote import remote_errors, url_fs


class LocalFiles:
    """Shard files in a local directory."""

    remote = False
    pread = staticmethod(os.pread)
    close = staticmethod(os.close)

    def __init__(self, root: str) -> None:
        self.root = root

    def join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def open(self, path: str) -> int:
        """A descriptor; ``FileNotFoundError`` when the file is missing."""
        return os.open(path, os.O_RDONLY)

    @staticmethod
    def size(fd: int) -> int:
        return os.fstat(fd).st_size


class FsspecFiles:
    """Shard files under an fsspec URL (``s3://bucket/cache.zarr``, ``http://host/cache.zarr``)."""

    remote = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = url_fs(url)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def open(self, path: str) -> tuple[str, int]:
        try:
            return path, int(self.fs.size(path))
        except FileNotFoundError:
            raise
        except remote_errors() as err:
            raise self._unreachable(path, err) from None

    @staticmethod
    def size(handle: tuple[str, int]) -> int:
        return handle[1]

    def pread(self, handle: tuple[str, int], n: int, offset: int) -> bytes:
        try:
            return self.fs.cat_file(handle[0], start=offset, end=offset + n)
        except remote_errors() as err:
            raise self._unreachable(handle[0], err) from None

    def pread_many(self, ranges: list[tuple[tuple[str, int], int, int]]) -> list[bytes]:
        """``(handle, n, offset)`` ranges, in one call."""
        try:
            return self.fs.cat_ranges([h[0] for h, _, _ in ranges], [o for _, _, o in ranges],
                                      [o + n for _, n, o in ranges], on_error="raise")
        except remote_errors() as err:
            raise self._unreachable(ranges[0][0][0], err) from None

    @staticmethod
    def close(handle: Any) -> None:
        pass

    def _unreachable(self, path: str, err: BaseException) -> HgkdError:
        return HgkdError(f"{self.url}: cannot read {path} ({type(err).__name__}: {err}); check the URL and the network")

    def __getstate__(self) -> dict:  # a fresh filesystem per process
        return {"url": self.url}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"])
