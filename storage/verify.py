"""`hgkd-extract verify`: read every chunk of a cache and check it is whole and consistent.

Checks, per cache shard: a completion record exists and matches the cache's settings; every
array's shard file is present (a deleted file would silently read as zeros) and decodes
(crc32c on every chunk and shard index of every array); row bookkeeping has no holes or duplicates (inside
each row block, row = first row + sample index * block views + view offset, issue 12; status
ok/skipped for every row, counts equal the record). Padding rows between growth blocks are
outside every shard's rows and are not checked. Complete shards with a problem are listed in
``damaged``: ``hgkd-extract repair`` clears them for re-extraction (``extract/repair.py``).
Caches made before issue 11 store ``key`` without crc32c; ``unchecked`` names such arrays.
A damaged completion record (issue 21) is a damaged shard: repair clears it, the next run rewrites it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cache import STATUS_OK, STATUS_SKIPPED, FeatureCache


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    views_ok: int = 0
    views_skipped: int = 0
    damaged: set[int] = field(default_factory=set)  # complete shards whose data or record is bad
    unchecked: list[str] = field(default_factory=list)  # arrays without crc32c (old caches): flips go unseen

    def problem(self, shard: int | None, line: str) -> None:
        self.problems.append(line)
        if shard is not None:
            self.damaged.add(shard)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard(cache: FeatureCache, shard: int, report: VerifyReport, seen_keys: dict[str, int]) -> None:
    rows = cache.shard_rows(shard)
    where = f"shard {shard} (rows {rows.start}-{rows.stop - 1})"
    record = cache.record_state(shard)
    if isinstance(record, str):  # a damaged record reads as none: the shard is extracted again (issue 21)
        report.problem(shard, f"{where}: completion record shards/{shard:06d}/zarr.json is damaged ({record}); "
                              "the shard counts as unfinished")
        return
    if record is None:
        report.problems.append(f"{where}: not complete; re-run the same 'hgkd-extract run' command to finish it")
        return
    if record.get("settings") != cache.meta.fingerprint():
        report.problem(shard, f"{where}: written with other settings than the cache's metadata")
    data = {}
    for name in cache.arrays:
        array = cache.group[name]
        if not cache.has_shard_file(name, shard):
            report.problem(shard, f"{where}: array '{name}' has no data on storage (file missing)")
            continue
        try:
            data[name] = array[rows.start : rows.stop]
        except Exception as err:  # checksum mismatch, truncated shard, bad index...
            report.problem(shard, f"{where}: array '{name}' is corrupt ({type(err).__name__}: {err})")
    report.shards_checked += 1
    if not {"status", "index", "view_index", "key"} <= set(data):
        return
    row_ids = np.arange(rows.start, rows.stop)
    index, view_index = cache.block_of_shard(shard).locate(row_ids)
    status = data["status"]
    n_ok, n_skip = int((status == STATUS_OK).sum()), int((status == STATUS_SKIPPED).sum())
    if n_ok + n_skip != len(rows):
        report.problem(shard, f"{where}: {len(rows) - n_ok - n_skip} rows were never written (holes)")
    if (n_ok, n_skip) != (record.get("num_ok"), record.get("num_skipped")):
        report.problem(shard, f"{where}: record says {record.get('num_ok')} ok/{record.get('num_skipped')} skipped, "
                               f"arrays hold {n_ok}/{n_skip}")
    bad = (data["index"] != index) | (data["view_index"] != view_index)
    if bad.any():
        report.problem(shard, f"{where}: {int(bad.sum())} rows hold another view's data (duplicates or misplaced)")
    for row, key, view_index in zip(row_ids, data["key"], data["view_index"]):
        tag = f"{key}#{view_index}"
        if tag in seen_keys:
            report.problem(shard, f"{where}: view {tag} is stored twice (rows {seen_keys[tag]} and {row})")
        seen_keys[tag] = int(row)
    report.views_ok += n_ok
    report.views_skipped += n_skip


def verify_cache(url: str | FeatureCache) -> VerifyReport:
    """Check every shard of the cache at ``url`` (or an open cache); problems are one line each."""
    cache = url if isinstance(url, FeatureCache) else FeatureCache.open(url)
    report = VerifyReport(unchecked=cache.unchecked_arrays())
    seen: dict[str, int] = {}
    for shard in range(cache.num_shards):
        verify_shard(cache, shard, report, seen)
    if report.ok and not cache.is_complete():
        report.problems.append("cache metadata is not marked complete although every shard is")
    return report
