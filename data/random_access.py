"""Random access to a source's samples by index, for stage two and evaluation.

Tar shards' member offsets come from the persistent sample index (``sample_index``: scanned
once, reused while each tar's stamp matches); folders are listed. ``read(index)`` then
fetches one image's bytes: ``os.pread`` for a local tar, a ranged fsspec read for a URL.
A tar that changes after the index was taken is refused on its first read in each process,
never read at stale offsets; a local tar is re-checked after every read, so one rewritten in
place mid-run (same size) is refused too (issue 21). A remote member that comes back short is
read again (``remote.RangeReader``); an image the cache holds as decoded that no longer decodes
is one line saying the tar changed (:meth:`RandomAccessSource.decode_cached`), never a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import HgkdError
from ..remote import RangeReader, is_url, stamp
from .sample_index import index_tars, list_folder
from .sources import DataSource, check_counted, folder_labels, open_source, text_key
from .views import decode_image


class RandomAccessSource:
    """Read sample ``index``'s image bytes directly: tar member offsets, or folder paths.

    ``index``: where the sample index lives (``"default"``: ``sample_index.index_dir()``;
    None: scan without keeping). The source's ``num_samples`` is set from the index.
    """

    def __init__(self, source: DataSource, index: str | Path | None = "default") -> None:
        self.source = source
        if source.kind == "folder":
            root = Path(source.spec[0])
            self._urls = [str(root / rel) for rel, _ in source.entries]
            self._tar = np.arange(len(source.entries), dtype=np.int64)
            self._offsets = np.zeros(len(source.entries), np.int64)
            self._sizes = np.full(len(source.entries), -1, np.int64)  # whole file
            self._stamps = None
            self.keys = [text_key(str(Path(rel).with_suffix(""))) for rel, _ in source.entries]
            self.labels = folder_labels([rel for rel, _ in source.entries])
        else:
            self._urls = [url for url, _ in source.entries]
            self._stamps = source.stamps if source.stamps is not None else [stamp(url) for url in self._urls]
            tars = index_tars(self._urls, self._stamps, index)
            self._tar = np.repeat(np.arange(len(tars), dtype=np.int32), [len(t) for t in tars])
            self._offsets = np.concatenate([t.offsets for t in tars]) if tars else np.zeros(0, np.int64)
            self._sizes = np.concatenate([t.sizes for t in tars]) if tars else np.zeros(0, np.int64)
            self.keys = [k for t in tars for k in t.keys]
            self.labels = [int(x) for t in tars for x in t.labels]
            source.num_samples = len(self.keys)
            check_counted(source, int((self._offsets >= 0).sum()))
        self._handles: dict[int, int] = {}  # tar -> descriptor, read with os.pread
        self._checked: set[int] = set()  # remote tars whose stamp was checked in this process
        self._remote = RangeReader()

    def read(self, index: int) -> bytes | None:
        """One sample's image bytes. ``os.pread`` never moves a shared file position, so
        DataLoader workers forked with these descriptors cannot read each other's bytes."""
        tar, offset, size = int(self._tar[index]), int(self._offsets[index]), int(self._sizes[index])
        if offset < 0:
            return None
        url = self._urls[tar]
        if is_url(url):
            self._check_remote(tar)
            data = self._remote.read(url, offset, size)
        elif size < 0:  # a folder's file: its listed size must still hold (the listing may be kept)
            data = Path(url).read_bytes()
            if len(data) != self.source.entries[index][1]:
                raise HgkdError(f"--data {url} changed since its folder was listed ({len(data)} bytes, listed "
                                f"{self.source.entries[index][1]}); restart to list it again")
            return data
        else:
            fd = self._handles.get(tar)
            if fd is None:
                fd = self._handles[tar] = self._open_local(tar)
            data = os.pread(fd, size, offset)
            self._check_local(tar, fd)  # after the read: a rewrite before it finished is seen
        if len(data) != size:
            raise HgkdError(f"--data {url}: sample {index} is cut short ({len(data)} of {size} bytes); "
                            f"the tar changed or is truncated - restart to index it again")
        return data

    def read_many(self, indices: list[int]) -> list[bytes | None]:
        """Several samples' image bytes; a remote tar's members in one batched ranged request."""
        out: list[bytes | None] = [None] * len(indices)
        remote: dict[int, list[int]] = {}  # tar -> positions in ``indices``
        for pos, index in enumerate(indices):
            tar = int(self._tar[index])
            if self._offsets[index] >= 0 and is_url(self._urls[tar]):
                remote.setdefault(tar, []).append(pos)
            else:
                out[pos] = self.read(index)
        for tar, positions in remote.items():
            self._check_remote(tar)
            ranges = [(int(self._offsets[indices[p]]), int(self._sizes[indices[p]])) for p in positions]
            for pos, (_, size), data in zip(positions, ranges, self._remote.read_many(self._urls[tar], ranges)):
                if len(data) != size:
                    raise HgkdError(f"--data {self._urls[tar]}: sample {indices[pos]} is cut short ({len(data)} of "
                                    f"{size} bytes); the tar changed or is truncated - restart to index it again")
                out[pos] = data
        return out

    def decode_cached(self, index: int, data: bytes, decode: Callable[[bytes], torch.Tensor] = decode_image
                      ) -> torch.Tensor:
        """Decode sample ``index``'s image, one the teacher decoded when the cache was made; when
        it no longer decodes, one line saying its tar changed (since this run indexed it, or
        in place since extraction) instead of the decoder's traceback (issue 21)."""
        try:
            return decode(data)
        except Exception as err:
            raise self._undecodable(index, err) from None

    def _undecodable(self, index: int, err: Exception) -> HgkdError:
        tar = int(self._tar[index])
        url = self._urls[tar]
        if self._stamps is not None:
            try:
                now = stamp(url)
            except (HgkdError, OSError):
                now = None
            if now != list(self._stamps[tar]):
                return self._changed(tar)
        return HgkdError(f"--data {url}: sample {index} ({self.keys[index]}) no longer decodes as an image "
                         f"({type(err).__name__}: {err}), although the teacher decoded it when the cache was made: "
                         f"the file changed in place since extraction - restore the data the cache was made from, "
                         f"or re-extract the cache from this data (then re-index: start the run again)")

    def _open_local(self, tar: int) -> int:
        fd = os.open(self._urls[tar], os.O_RDONLY)
        try:
            self._check_local(tar, fd)
        except HgkdError:
            os.close(fd)
            raise
        return fd

    def _check_local(self, tar: int, fd: int) -> None:
        st = os.fstat(fd)
        if [st.st_size, st.st_mtime_ns, st.st_ino] != list(self._stamps[tar]):
            raise self._changed(tar)

    def _check_remote(self, tar: int) -> None:
        if tar not in self._checked:
            if stamp(self._urls[tar]) != list(self._stamps[tar]):
                raise self._changed(tar)
            self._checked.add(tar)

    def _changed(self, tar: int) -> HgkdError:
        return HgkdError(f"--data {self._urls[tar]} changed since this run indexed it (size or modification "
                         f"time differ); its sample offsets are stale - restart to index it again (and re-extract "
                         f"the cache if its images changed)")

    def __getstate__(self) -> dict:  # file handles stay per worker process
        return {**self.__dict__, "_handles": {}, "_checked": set()}


def open_indexed(spec: list[str] | str) -> DataSource:
    """``--data`` for reading through the sample index: tars are stamped (not read through), an
    image folder's kept listing is reused; counted when a :class:`RandomAccessSource` indexes it."""
    return open_source(spec, count=False, folder_lister=list_folder)


def open_random_access(spec: list[str] | str, index: str | Path | None = "default") -> RandomAccessSource:
    """``--data`` for random access: tars are stamped and indexed (not read through), folders listed."""
    return RandomAccessSource(open_indexed(spec), index)
