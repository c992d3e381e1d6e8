"""Which process writes a cache shard, and the completion record that marks it finished.

Several writers on one cache split the shards by ``rank``/``world_size`` and a per-shard lock
(local stores); a shard is finished once ``FeatureCache.record_shard`` stored its record.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import numpy as np

from .cache import STATUS_SKIPPED, FeatureCache
from .locks import ShardLock

log = logging.getLogger("hgkd.extract.run")  # the writer's log, as before the move


def claim_shard(cache: FeatureCache, shard: int, rank: int, world_size: int,
                done_at_start: set[int]) -> ShardLock | None | bool:
    """The shard's lock if this process should write it, None if no lock is needed, else False.

    ``done_at_start`` is listed once per run; a shard finished since then is caught by its
    own completion record, so the record folder is never re-listed per shard.
    """
    if shard % world_size != rank or shard in done_at_start:
        return False
    if cache.local_dir is None:  # remote store: disjoint --rank/--world-size shard sets keep writers apart
        return None if cache.shard_record(shard) is None else False
    lock = ShardLock(cache.local_dir, shard)
    if not lock.try_acquire():
        log.info("shard %d is being written by another process; skipping it", shard)
        return False
    if cache.shard_record(shard) is not None:  # finished while we were looking
        lock.release()
        return False
    return lock


def completion_record(cache: FeatureCache, shard: int, rows: range, status: np.ndarray,
                      skipped: list[dict[str, Any]], seconds: float | None = None) -> dict[str, Any]:
    """The record stored when ``shard`` (cache rows ``rows``, per-row ``status``) is written;
    ``seconds``: the extraction process's wall time on it (read, decode, teacher, encode; issue 22)."""
    n_skipped = int((status == STATUS_SKIPPED).sum())
    return {
        "shard": shard, "rows": [rows.start, rows.stop], "seconds": seconds,
        "num_ok": len(rows) - n_skipped, "num_skipped": n_skipped, "skipped": skipped,
        "settings": cache.meta.fingerprint(), "writer": f"{socket.gethostname()}:{os.getpid()}",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
