"""Background writer: whole cache shards go to Zarr on a thread while the teacher computes.

The extraction loop fills a ``ShardBuffer`` (all rows of one shard, in memory) and hands it
over; the writer stores each array in one call (no read-modify-write of a shard file, see
shared/notes/cache-storage.md), writes the completion record last and then releases the
shard's lock. At most ``max_pending`` buffers wait, which bounds memory.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..storage.cache import STATUS_MISSING, FeatureCache
from ..storage.fingerprint import MAX_VIEWS, write_fingerprint
from ..storage.locks import ShardLock

if TYPE_CHECKING:
    import torch


class ShardBuffer:
    """All arrays of one cache shard, filled batch by batch."""

    def __init__(self, cache: FeatureCache, shard: int) -> None:
        self.shard = shard
        self.rows = cache.shard_rows(shard)
        n = len(self.rows)
        self.arrays: dict[str, np.ndarray] = {}
        for name, spec in cache.arrays.items():
            dtype = object if spec.dtype is str else np.dtype(spec.dtype)
            self.arrays[name] = np.zeros((n, *spec.row_shape), dtype=dtype)
        self.arrays["key"][:] = ""
        self.arrays["label"][:] = -1
        self.skipped: list[dict[str, Any]] = []
        self.fingerprint: tuple[list[int], list[np.ndarray]] | None = ([], []) if shard == 0 else None
        self.started = time.perf_counter()  # the shard's extraction time goes into its completion record

    def keep_fingerprint(self, rows: list[int], views_vchw: "torch.Tensor") -> None:
        """Shard 0 keeps its first ``MAX_VIEWS`` views' pixels (``storage.fingerprint``)."""
        if self.fingerprint is None or len(self.fingerprint[0]) >= MAX_VIEWS:
            return
        take = MAX_VIEWS - len(self.fingerprint[0])
        self.fingerprint[0].extend(rows[:take])
        self.fingerprint[1].extend(views_vchw[:take].cpu().numpy())

    def put(self, first_row: int, values: dict[str, np.ndarray]) -> None:
        """Store a batch whose first row (cache-global) is ``first_row``."""
        start = first_row - self.rows.start
        for name, batch in values.items():
            self.arrays[name][start : start + len(batch)] = batch

    def missing_rows(self) -> int:
        return int((self.arrays["status"] == STATUS_MISSING).sum())


class BackgroundWriter:
    """One writer thread per process; ``submit`` blocks only when ``max_pending`` wait."""

    def __init__(self, cache: FeatureCache, max_pending: int = 1) -> None:
        self.cache = cache
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="hgkd-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, buffer: ShardBuffer, record: dict[str, Any], lock: ShardLock | None) -> None:
        self._raise_if_failed()
        if buffer.missing_rows():
            raise RuntimeError(f"shard {buffer.shard}: {buffer.missing_rows()} rows were never filled")
        self._queue.put((buffer, record, lock))

    def close(self) -> None:
        """Wait until every submitted shard is on storage; re-raise a writer failure."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            buffer, record, lock = item
            try:
                if self._error is None:
                    if buffer.fingerprint and buffer.fingerprint[0]:  # before the record: a complete shard 0 has it
                        write_fingerprint(self.cache, np.array(buffer.fingerprint[0]), np.stack(buffer.fingerprint[1]))
                    self.cache.write_shard(buffer.shard, buffer.arrays, record)
            except BaseException as err:  # surfaced in the main thread
                self._error = err
            finally:
                if lock is not None:
                    lock.release()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
