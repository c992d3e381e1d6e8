"""Random access to a source's samples by index, for stage two and evaluation.

Tar shards are indexed once into member offsets (webdataset's own grouping of members into
samples); folders are listed. ``read(index)`` then fetches one image's bytes with ``os.pread``.
"""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix

from ..errors import HgkdError
from .sources import IMAGE_EXTS, LABEL_EXTS, DataSource, folder_labels, parse_label, text_key

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default


class RandomAccessSource:
    """Read sample ``index``'s image bytes directly: tar member offsets, or folder paths."""

    def __init__(self, source: DataSource) -> None:
        self.source = source
        if source.kind == "folder":
            root = Path(source.spec[0])
            self._locations = [(str(root / rel), 0, -1) for rel, _ in source.entries]
            self.keys = [text_key(str(Path(rel).with_suffix(""))) for rel, _ in source.entries]
            self.labels = folder_labels([rel for rel, _ in source.entries])
        else:
            self._locations, self.keys, self.labels = self._index_tars(source)
        self._handles: dict[str, int] = {}  # path -> descriptor, read with os.pread

    @staticmethod
    def _index_tars(source: DataSource) -> tuple[list[tuple[str, int, int]], list[str], list[int]]:
        """Member offsets per sample (grouped by webdataset's own grouping) and class labels."""
        def members() -> Iterator[dict]:
            for url, _ in source.entries:
                if "://" in url:
                    raise HgkdError(f"--data {url}: stage two needs local tar files (random access)")
                with tarfile.open(url, mode="r:") as tar:
                    for info in tar:
                        name = info.name
                        if not info.isreg() or ("/" not in name and name.startswith(meta_prefix)
                                                and name.endswith(meta_suffix)) or _SKIP_META.match(name):
                            continue
                        is_label = name.rsplit(".", 1)[-1].lower() in LABEL_EXTS or name.endswith(".cls.txt")
                        data = tar.extractfile(info).read() if is_label else (url, info.offset_data, info.size)
                        yield {"fname": name, "data": data, "__url__": url}
                yield {}

        locations, keys, labels = [], [], []
        for sample in group_by_keys(members()):
            image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
            locations.append(image if image is not None else ("", 0, 0))
            keys.append(text_key(sample["__key__"]))
            labels.append(parse_label(next((sample[ext] for ext in LABEL_EXTS if ext in sample), None)))
        return locations, keys, labels

    def read(self, index: int) -> bytes | None:
        """One sample's image bytes. ``os.pread`` never moves a shared file position, so
        DataLoader workers forked with these descriptors cannot read each other's bytes."""
        path, offset, size = self._locations[index]
        if not path:
            return None
        if size < 0:
            return Path(path).read_bytes()
        fd = self._handles.get(path)
        if fd is None:
            fd = self._handles[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getstate__(self) -> dict:  # file handles stay per worker process
        return {**self.__dict__, "_handles": {}}
