"""``hgkd-extract repair``: make a damaged cache resumable, so the next run re-extracts only what was lost.

Lost or damaged array metadata (a deleted, torn or undecodable ``zarr.json``, issue 21), and
that of the ``shards`` group, is re-created from the cache's settings; chunk files are kept and
checked like any other. A damaged completion record is a deleted one: its shard is cleared.
The root ``zarr.json`` holds the settings themselves: when it is damaged, opening the cache says
it must be extracted again. Then every shard that ``verify`` finds
damaged, and every unfinished shard that left files behind (``run`` would remove those too),
loses its completion record first and then its array files, under the same shard lock
writers hold. The cache is marked incomplete;
re-running the ``hgkd-extract run`` command that made it writes exactly those shards again,
and the result equals an uninterrupted run (the views are deterministic).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import HgkdError
from ..storage.cache import ATTR, FeatureCache
from ..storage.locks import ShardLock
from ..storage.verify import verify_cache

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    restored_arrays: list[str] = field(default_factory=list)  # metadata re-created (arrays, the shards group)
    cleared: list[int] = field(default_factory=list)  # shards to extract again
    busy: list[int] = field(default_factory=list)  # locked by a live writer: left alone

    @property
    def changed(self) -> bool:
        return bool(self.restored_arrays or self.cleared)


def repair_cache(url: str) -> RepairReport:
    """Clear the damaged shards of the local cache at ``url`` for re-extraction."""
    cache = FeatureCache.open(url, mode="r+", require_arrays=False)
    if cache.local_dir is None:
        raise HgkdError(f"{url}: repair needs a cache on the local file system (shard locks); copy it locally")
    report = RepairReport(restored_arrays=cache.restore_metadata())
    found = verify_cache(cache)
    done = cache.completed_shards()
    leftovers = {s for s in range(cache.num_shards) if s not in done
                 and any(cache.has_shard_file(name, s) for name in cache.arrays)}
    for shard in sorted(found.damaged | leftovers):
        lock = ShardLock(cache.local_dir, shard)
        if not lock.try_acquire():
            report.busy.append(shard)
            continue
        try:
            cache.clear_shard(shard)
        finally:
            lock.release()
        report.cleared.append(shard)
        log.info("shard %d cleared for re-extraction", shard)
    if report.cleared and cache.is_complete():
        cache.meta.status = "incomplete"
        cache.group.attrs[ATTR] = cache.meta.to_json()
    return report
