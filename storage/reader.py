"""`ShardReader`: fast random reads of cache rows, decoded by Zarr's own codec objects.

zarr-python pays a per-call overhead, fetches a shard's index again on every read
(``shared/notes/cache-storage.md``), and on ViT-sized rows its orthogonal selection
(``FeatureCache.read``) builds coordinates for every selected element: tens of views/s
(``benchmarks/reader.py``). This reader keeps the parts that make the data trustworthy and
drops the per-call path:

- every shard file's index (``(n_chunks, 2)`` uint64 offset/nbytes + crc32c, Zarr's sharding
  format) is read and checked once, then kept;
- only the wanted chunks' bytes are read, with ``os.pread`` on a kept file descriptor;
- bytes are decoded by the array's own codec objects taken from ``array.metadata.codecs``
  (for ``tokens`` the sharding codec's inner chain ``BytesCodec -> BloscCodec ->
  Crc32cCodec``, for the index its ``index_codecs``), through their synchronous
  ``_decode_sync`` - the ``zarr.abc.codec.SupportsSyncCodec`` protocol of zarr 3.1 - in the
  order Zarr's ``BatchedCodecPipeline`` applies them, so the crc32c check, blosc and dtype
  handling are Zarr's; nothing is re-implemented here. Blosc releases the GIL, so a batch
  decodes on ``threads`` threads;
- the small per-view arrays (one chunk per cache shard) are decoded whole and kept in a
  small LRU per array.

Only rows of shards with a completion record are served; a corrupt chunk, a missing file or
a missing chunk raises :class:`HgkdError` naming the array and shard, never returns zeros.
Bytes from a remote store that fail their check (crc32c, or fewer bytes than asked) are read
again within the retry bound (``hgkd.remote.reread``, issue 21) before they are called damage;
they are never decoded into a batch.
A cache at an fsspec URL (``s3://``, ``http://``, ``memory://``) is read the same way with
ranged requests (``storage.files.FsspecFiles``: one ``cat_ranges`` call per batch) instead
of ``os.pread``; arrays whose codecs are not all synchronous are read through zarr-python
(same results, zarr's speed).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch
import zarr
from zarr.abc.codec import Codec, SupportsSyncCodec
from zarr.codecs.sharding import ShardingCodec, ShardingCodecIndexLocation
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.codec_pipeline import codecs_from_list

from ..errors import HgkdError
from ..remote import Reread, reread
from .cache import FeatureCache
from .codecs import decode_tokens
from .files import FsspecFiles, LocalFiles

_MISSING = np.iinfo(np.uint64).max  # Zarr's index entry of a chunk that was never written
T = TypeVar("T")


class _ShortChunk(ValueError):
    """Fewer bytes than the shard index (or the file's size) says."""


class _CodecChain:
    """One chunk's codec objects with their resolved specs, applied like Zarr's pipeline."""

    def __init__(self, codecs: Sequence[Codec], spec: ArraySpec) -> None:
        array_array, array_bytes, bytes_bytes = codecs_from_list(codecs)
        if not all(isinstance(c, SupportsSyncCodec) for c in (*array_array, array_bytes, *bytes_bytes)):
            raise TypeError("codec chain has codecs without a synchronous decode")
        self.array_steps = []
        for codec in array_array:
            self.array_steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        self.array_bytes = (array_bytes, spec)
        spec = array_bytes.resolve_metadata(spec)
        self.bytes_steps = []
        for codec in bytes_bytes:
            self.bytes_steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        self.bytes_steps.reverse()
        self.array_steps.reverse()
        self.buffer = self.array_bytes[1].prototype.buffer

    def decode(self, raw: bytes) -> np.ndarray:
        data = self.buffer.from_bytes(raw)
        for codec, spec in self.bytes_steps:
            data = codec._decode_sync(data, spec)
        codec, spec = self.array_bytes
        data = codec._decode_sync(data, spec)
        for codec, spec in self.array_steps:
            data = codec._decode_sync(data, spec)
        return data.as_numpy_array()


def _chunk_spec(array: zarr.Array, shape: tuple[int, ...]) -> ArraySpec:
    meta = array.metadata
    return ArraySpec(shape=shape, dtype=meta.dtype, fill_value=meta.fill_value, config=array.config,
                     prototype=default_buffer_prototype())


class _ArrayReader:
    """Shared bookkeeping of one per-view array stored under a directory or fsspec URL."""

    def __init__(self, cache: FeatureCache, name: str, files: LocalFiles | FsspecFiles) -> None:
        self.url, self.name = cache.url, name
        self.shard_views, self.num_views = cache.shard_views, cache.num_views
        self.array = cache.group[name]
        self.files = files
        self.row_shape = tuple(self.array.shape[1:])
        self.dtype = self.array.dtype

    def where(self, shard: int) -> str:
        start = shard * self.shard_views
        stop = min(start + self.shard_views, self.num_views)
        return f"{self.url}: array '{self.name}', shard {shard} (rows {start}-{stop - 1})"

    def path(self, shard: int) -> str:
        coords = (shard,) + (0,) * len(self.row_shape)
        return self.files.join(*self.array.path.split("/"), *self.array.metadata.encode_chunk_key(coords).split("/"))

    def open(self, shard: int) -> Any:
        try:
            return self.files.open(self.path(shard))
        except FileNotFoundError:
            raise HgkdError(f"{self.where(shard)}: shard file {self.path(shard)} is missing although the shard "
                            f"is recorded complete; the cache is damaged - run 'hgkd-extract verify'") from None

    def corrupt(self, shard: int, what: str, err: Exception) -> HgkdError:
        return HgkdError(f"{self.where(shard)} is corrupt: {what} does not decode ({type(err).__name__}: {err}); "
                         f"run 'hgkd-extract verify' and re-extract that shard")

    def checked(self, shard: int, what: str, raw: bytes, read: Callable[[], bytes],
                decode: Callable[[bytes], T]) -> T:
        """``decode(raw)``; when it fails on a remote store's bytes (crc32c, short), ``read()`` and
        decode again within the retry bound before calling it damage (issue 21); local bytes
        are judged at once."""
        first = [raw]

        def attempt() -> T:
            data = first.pop() if first else read()
            try:
                return decode(data)
            except Exception as err:
                error = self.corrupt(shard, what, err)
                if not self.files.remote:
                    raise error from err
                raise Reread("short_read" if isinstance(err, _ShortChunk) else "crc", error) from err

        return reread(attempt)

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n, *self.row_shape), dtype=self.dtype)

    def close(self) -> None:
        pass


class _ShardedRows(_ArrayReader):
    """An array with Zarr's sharding codec and one view per inner chunk (``tokens``)."""

    def __init__(self, cache: FeatureCache, name: str, files: LocalFiles | FsspecFiles, max_open: int) -> None:
        super().__init__(cache, name, files)
        (sharding,) = self.array.metadata.codecs
        if not isinstance(sharding, ShardingCodec) or sharding.chunk_shape != (1, *self.row_shape):
            raise TypeError(f"{name}: not sharded with one row per inner chunk")
        if self.array.metadata.chunk_grid.chunk_shape[0] != self.shard_views:
            raise TypeError(f"{name}: Zarr shards are not cache shards")
        self.chunks_per_shard = (self.shard_views,) + (1,) * len(self.row_shape)
        self.inner = _CodecChain(sharding.codecs, _chunk_spec(self.array, sharding.chunk_shape))
        # Zarr's own index geometry and spec: its size includes the checksum of index_codecs.
        self.index_size = sharding._shard_index_size(self.chunks_per_shard)
        self.index_chain = _CodecChain(sharding.index_codecs, sharding._get_index_chunk_spec(self.chunks_per_shard))
        self.index_at_end = sharding.index_location == ShardingCodecIndexLocation.end
        self.max_open = max_open
        self.fds: OrderedDict[int, int] = OrderedDict()  # shard -> open file, LRU
        self.indexes: dict[int, np.ndarray] = {}  # shard -> (shard_views, 2) uint64 offset, nbytes

    def close(self) -> None:
        for fd in self.fds.values():
            self.files.close(fd)
        self.fds.clear()

    def shard_file(self, shard: int, keep: set[int]) -> tuple[int, np.ndarray]:
        """Open file and checked index of one shard (main thread only: it may close files)."""
        fd = self.fds.get(shard)
        if fd is None:
            while len(self.fds) >= self.max_open:
                old = next((s for s in self.fds if s not in keep), None)
                if old is None:
                    break
                self.files.close(self.fds.pop(old))
            fd = self.fds[shard] = self.open(shard)
        else:
            self.fds.move_to_end(shard)
        index = self.indexes.get(shard)
        if index is None:
            index = self.indexes[shard] = self.load_index(shard, fd)
        return fd, index

    def load_index(self, shard: int, fd: int) -> np.ndarray:
        size = self.files.size(fd)
        if size < self.index_size:
            short = ValueError(f"file has {size} bytes, the index alone needs {self.index_size}")
            raise self.corrupt(shard, "the shard index", short)
        at = size - self.index_size if self.index_at_end else 0

        def decode(raw: bytes) -> np.ndarray:
            if len(raw) != self.index_size:
                raise _ShortChunk(f"read {len(raw)} of {self.index_size} bytes")
            return self.index_chain.decode(raw).reshape(self.shard_views, 2)

        read = lambda: self.files.pread(fd, self.index_size, at)  # noqa: E731
        index = self.checked(shard, "the shard index", read(), read, decode)
        offset, nbytes = index[:, 0], index[:, 1]
        present = (offset != _MISSING) | (nbytes != _MISSING)
        if ((offset > size) | (nbytes > size - np.minimum(offset, size)))[present].any():
            raise self.corrupt(shard, "the shard index", ValueError("chunk ranges run past the end of the file"))
        return index

    def read(self, rows: np.ndarray, pool: ThreadPoolExecutor | None, threads: int) -> np.ndarray:
        out = self.empty(len(rows))
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        first = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        unique = sorted_rows[first]
        shards = unique // self.shard_views
        keep = set(shards.tolist())
        files = {s: self.shard_file(s, keep) for s in keep}
        jobs = []
        for row, shard, pos in zip(unique.tolist(), shards.tolist(), order[first].tolist()):
            fd, index = files[shard]
            offset, nbytes = index[row - shard * self.shard_views]
            if offset == _MISSING and nbytes == _MISSING:
                raise HgkdError(f"{self.where(shard)}: row {row} was never written (chunk missing from the "
                                f"shard index); the cache is damaged - run 'hgkd-extract verify'")
            jobs.append((row, shard, pos, fd, int(offset), int(nbytes)))
        if self.files.remote:  # one batched ranged request, then decode
            raws = self.files.pread_many([(fd, nbytes, offset) for *_, fd, offset, nbytes in jobs]) if jobs else []
            for job, raw in zip(jobs, raws):
                self.decode_row(out, job, raw)
        elif pool and len(jobs) > 1:
            parts = np.array_split(np.arange(len(jobs)), threads)
            list(pool.map(lambda part: self.decode_into(out, [jobs[i] for i in part]), parts))
        else:
            self.decode_into(out, jobs)
        dup = np.ones(len(rows), dtype=bool)
        dup[first] = False
        if dup.any():  # repeated rows: copy from the first occurrence
            src = order[first[np.cumsum(~dup) - 1]]
            out[order[dup]] = out[src[dup]]
        return out

    def decode_into(self, out: np.ndarray, jobs: list[tuple[int, int, int, int, int, int]]) -> None:
        for job in jobs:
            fd, offset, nbytes = job[3:]
            self.decode_row(out, job, os.pread(fd, nbytes, offset))

    def decode_row(self, out: np.ndarray, job: tuple[int, int, int, Any, int, int], raw: bytes) -> None:
        row, shard, pos, fd, offset, nbytes = job

        def decode(data: bytes) -> np.ndarray:
            if len(data) != nbytes:
                raise _ShortChunk(f"read {len(data)} of {nbytes} bytes (truncated file)")
            return self.inner.decode(data).reshape(self.row_shape)

        out[pos] = self.checked(shard, f"the chunk of row {row}", raw, lambda: self.files.pread(fd, nbytes, offset),
                                decode)


class _ChunkedRows(_ArrayReader):
    """A small array with one chunk per cache shard; decoded chunks are kept in an LRU."""

    def __init__(self, cache: FeatureCache, name: str, files: LocalFiles | FsspecFiles, lru_shards: int) -> None:
        super().__init__(cache, name, files)
        chunk_shape = self.array.metadata.chunk_grid.chunk_shape
        if chunk_shape[0] != self.shard_views:
            raise TypeError(f"{name}: chunks are not one cache shard")
        self.chain = _CodecChain(self.array.metadata.codecs, _chunk_spec(self.array, chunk_shape))
        self.lru_shards = lru_shards
        self.lru: OrderedDict[int, np.ndarray] = OrderedDict()

    def load(self, shard: int) -> np.ndarray:
        fd = self.open(shard)
        try:
            size = self.files.size(fd)
            read = lambda: self.files.pread(fd, size, 0)  # noqa: E731

            def decode(raw: bytes) -> np.ndarray:
                if len(raw) != size:
                    raise _ShortChunk(f"read {len(raw)} of {size} bytes")
                return self.chain.decode(raw)

            return self.checked(shard, "its chunk", read(), read, decode)
        finally:
            self.files.close(fd)

    def read(self, rows: np.ndarray, pool: ThreadPoolExecutor | None, threads: int) -> np.ndarray:
        shards = rows // self.shard_views
        needed = np.unique(shards).tolist()
        chunks = {s: self.lru[s] for s in needed if s in self.lru}
        missing = [s for s in needed if s not in chunks]
        loaded = pool.map(self.load, missing) if pool and len(missing) > 1 else map(self.load, missing)
        chunks.update(zip(missing, loaded))
        for s in needed:
            self.lru[s] = chunks[s]
            self.lru.move_to_end(s)
        while len(self.lru) > self.lru_shards:
            self.lru.popitem(last=False)
        if len(needed) == 1:
            return chunks[needed[0]][rows - needed[0] * self.shard_views]
        out = self.empty(len(rows))
        for s in needed:
            hit = shards == s
            out[hit] = chunks[s][rows[hit] - s * self.shard_views]
        return out


class _ZarrRows:
    """Fallback: zarr-python's own read path (non-local stores, unusual codecs)."""

    def __init__(self, cache: FeatureCache, name: str) -> None:
        self.array = cache.group[name]

    def read(self, rows: np.ndarray, pool: ThreadPoolExecutor | None, threads: int) -> np.ndarray:
        return self.array.get_orthogonal_selection((rows,))

    def close(self) -> None:
        pass


class ShardReader:
    """Random batches of cache rows, equal to :meth:`FeatureCache.read`, without zarr's per-call path.

    ``arrays`` are what :meth:`read` returns by default (all per-view arrays if None);
    ``threads`` decode a batch in parallel; ``lru_shards`` decoded chunks per small array
    are kept; at most ``max_open_files`` shard files per sharded array stay open. Picklable:
    files, indexes and threads are re-created lazily in each process (DataLoader worker).
    One reader serves one caller at a time (a lock serialises concurrent ``read`` calls).
    """

    def __init__(self, cache: FeatureCache, arrays: list[str] | None = None, threads: int = 2,
                 lru_shards: int = 16, max_open_files: int = 256) -> None:
        unknown = set(arrays or ()) - set(cache.arrays)
        if unknown:
            raise HgkdError(f"{cache.url}: no per-view arrays named {sorted(unknown)} in the cache")
        self.cache = cache
        self.arrays = list(arrays) if arrays is not None else list(cache.arrays)
        self.threads = max(1, int(threads))
        self.lru_shards, self.max_open_files = lru_shards, max_open_files
        self._complete: set[int] = cache.completed_shards()
        self._reset()

    def _reset(self) -> None:
        self._readers: dict[str, Any] = {}
        self._files: LocalFiles | FsspecFiles | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        """A forked DataLoader worker inherits no threads and maybe a held lock: start afresh."""
        for reader in self._readers.values():
            reader.close()  # this process's copies of the parent's files
        if self.cache.local_dir is None:  # a remote store's client belongs to the parent's event loop
            self.cache = FeatureCache.open(self.cache.url)
        self._reset()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_files", "_pool", "_lock", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        """Close kept files and threads (also dropped: indexes and decoded chunks)."""
        if self._pid != os.getpid():
            self._after_fork()
            return
        for reader in self._readers.values():
            reader.close()
        if self._pool is not None:
            self._pool.shutdown()
        self._reset()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- reading ----------------------------------------------------------------------
    def read(self, rows: Iterable[int] | np.ndarray, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Raw stored arrays for ``rows`` (any order, repeats allowed), rows in the given order."""
        idx = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64).reshape(-1)
        wanted = list(names) if names is not None else self.arrays
        if len(idx) and (idx.min() < 0 or idx.max() >= self.cache.num_views):
            bad = idx[(idx < 0) | (idx >= self.cache.num_views)][0]
            raise IndexError(f"row {bad} is outside the cache's {self.cache.num_views} views")
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            self._check_complete(idx)
            pool = self._thread_pool()
            return {name: self._reader(name).read(idx, pool, self.threads) for name in wanted}

    def read_tokens(self, rows: Iterable[int] | np.ndarray) -> torch.Tensor:
        """Decoded float32 teacher tokens (B, N, C), like :meth:`FeatureCache.read_tokens`."""
        names = ["tokens", *self.cache.codec.aux_arrays(1, 1)]
        return decode_tokens(self.read(rows, names), self.cache.codec)

    # ---- internals --------------------------------------------------------------------
    def _check_complete(self, idx: np.ndarray) -> None:
        shards = set(np.unique(idx // self.cache.shard_views).tolist())
        if shards <= self._complete:
            return
        self._complete = self.cache.completed_shards()  # shards may have completed since
        pending = sorted(shards - self._complete)
        if pending:
            shard = pending[0]
            rows = self.cache.shard_rows(shard)
            raise HgkdError(f"{self.cache.url}: shard {shard} (rows {rows.start}-{rows.stop - 1}) has no completion "
                            f"record, so its rows are not served; finish it with 'hgkd-extract run' "
                            f"({len(pending)} pending shard(s) in this batch)")

    def _thread_pool(self) -> ThreadPoolExecutor | None:
        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hgkd-reader")
        return self._pool

    def _reader(self, name: str) -> Any:
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = self._make_reader(name)
        return reader

    def _make_reader(self, name: str) -> Any:
        if name not in self.cache.arrays:
            raise HgkdError(f"{self.cache.url}: no per-view array named '{name}' in the cache")
        try:
            if self.cache.arrays[name].sharded:
                return _ShardedRows(self.cache, name, self._shard_files(), self.max_open_files)
            return _ChunkedRows(self.cache, name, self._shard_files(), self.lru_shards)
        except TypeError:  # a layout or codec this reader does not handle: zarr-python's path
            return _ZarrRows(self.cache, name)

    def _shard_files(self) -> LocalFiles | FsspecFiles:
        """The local fast path (``os.pread``) or ranged reads through fsspec, one per reader."""
        if self._files is None:
            root = self.cache.local_dir
            self._files = LocalFiles(root) if root is not None else FsspecFiles(self.cache.url)
        return self._files
