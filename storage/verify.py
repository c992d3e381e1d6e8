"""`hgkd-extract verify`: read every chunk of a cache and check it is whole and consistent.

Checks, per cache shard: a completion record exists and matches the cache's settings; every
array's shard file is present (a deleted file would silently read as zeros) and decodes
(crc32c on every chunk and shard index); row bookkeeping has no holes or duplicates (inside
each row block, row = first row + sample index * block views + view offset, issue 12; status
ok/skipped for every row, counts equal the record). Padding rows between growth blocks are
outside every shard's rows and are not checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.core.sync import sync

from .cache import STATUS_OK, STATUS_SKIPPED, FeatureCache


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    views_ok: int = 0
    views_skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _shard_file_exists(array: zarr.Array, shard: int) -> bool:
    coords = (shard,) + (0,) * (array.ndim - 1)
    key = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
    return bool(sync(array.store.exists(key)))


def verify_shard(cache: FeatureCache, shard: int, report: VerifyReport, seen_keys: dict[str, int]) -> None:
    rows = cache.shard_rows(shard)
    where = f"shard {shard} (rows {rows.start}-{rows.stop - 1})"
    record = cache.shard_record(shard)
    if record is None:
        report.problems.append(f"{where}: not complete; re-run the same 'hgkd-extract run' command to finish it")
        return
    if record.get("settings") != cache.meta.fingerprint():
        report.problems.append(f"{where}: written with other settings than the cache's metadata")
    data = {}
    for name in cache.arrays:
        array = cache.group[name]
        if not _shard_file_exists(array, shard):
            report.problems.append(f"{where}: array '{name}' has no data on storage (file missing)")
            continue
        try:
            data[name] = array[rows.start : rows.stop]
        except Exception as err:  # checksum mismatch, truncated shard, bad index...
            report.problems.append(f"{where}: array '{name}' is corrupt ({type(err).__name__}: {err})")
    report.shards_checked += 1
    if not {"status", "index", "view_index", "key"} <= set(data):
        return
    row_ids = np.arange(rows.start, rows.stop)
    index, view_index = cache.block_of_shard(shard).locate(row_ids)
    status = data["status"]
    n_ok, n_skip = int((status == STATUS_OK).sum()), int((status == STATUS_SKIPPED).sum())
    if n_ok + n_skip != len(rows):
        report.problems.append(f"{where}: {len(rows) - n_ok - n_skip} rows were never written (holes)")
    if (n_ok, n_skip) != (record.get("num_ok"), record.get("num_skipped")):
        report.problems.append(f"{where}: record says {record.get('num_ok')} ok/{record.get('num_skipped')} skipped, "
                               f"arrays hold {n_ok}/{n_skip}")
    bad = (data["index"] != index) | (data["view_index"] != view_index)
    if bad.any():
        report.problems.append(f"{where}: {int(bad.sum())} rows hold another view's data (duplicates or misplaced)")
    for row, key, view_index in zip(row_ids, data["key"], data["view_index"]):
        tag = f"{key}#{view_index}"
        if tag in seen_keys:
            report.problems.append(f"{where}: view {tag} is stored twice (rows {seen_keys[tag]} and {row})")
        seen_keys[tag] = int(row)
    report.views_ok += n_ok
    report.views_skipped += n_skip


def verify_cache(url: str) -> VerifyReport:
    """Check every shard of the cache at ``url``; problems are one line each."""
    cache = FeatureCache.open(url)
    report = VerifyReport()
    seen: dict[str, int] = {}
    for shard in range(cache.num_shards):
        verify_shard(cache, shard, report, seen)
    if report.ok and not cache.is_complete():
        report.problems.append("cache metadata is not marked complete although every shard is")
    return report
