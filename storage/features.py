"""`FeatureStore`: frozen features of one model on one data set (the evaluation's feature cache).

A Zarr v3 group with three row arrays, one row per labelled sample of the source:

* ``features`` (N, D) float32, stored in shards of ``shard_rows`` rows (Zarr's sharding codec,
  inner chunks of ``chunk_rows`` rows, lz4 + crc32c as the teacher cache);
* ``index`` (N,) int64: the sample's position in the source;
* ``status`` (N,) uint8: 0 not written, 1 ok, 2 undecodable image (its features are zeros).

A writer fills whole shards and records each one in ``shards/<i>`` after its arrays (as
``cache.py`` does); the root's ``status`` turns ``complete`` only after the last record. So an
interrupted extraction resumes at the first unrecorded shard, and :meth:`FeatureStore.open`
refuses a store that is not complete: a half-written cache never reads as valid. Zarr reads a
missing chunk file as its fill value (zeros), so a recorded shard whose ``features`` or ``status``
file is gone, or whose status is damaged or unwritten, is found by :meth:`FeatureStore.lost_shards`
and recomputed (issue 21: a lost chunk once scored kNN at 10% instead of 51%). The store
knows rows and numbers only; what the rows mean (model, data, view recipe) is the caller's
``meta``, compared on every open.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ..errors import HgkdError
from .codecs import CodecSpec

FORMAT = "hgkd-feature-cache"
FORMAT_VERSION = 1
ATTR = "hgkd"
SHARDS_GROUP = "shards"
STATUS_MISSING, STATUS_OK, STATUS_UNDECODABLE = 0, 1, 2


class FeatureStore:
    """Rows of frozen features, written shard by shard, readable in contiguous blocks."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        blob = group.attrs.get(ATTR)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise HgkdError(f"{url}: a Zarr group but not an hgkd feature cache (no '{ATTR}' metadata)")
        self.group, self.url, self.blob = group, url, blob

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, url: str, meta: dict[str, Any], index: np.ndarray, dim: int,
                         shard_rows: int = 2048, chunk_rows: int = 256) -> "FeatureStore":
        """The store at ``url`` for ``meta``: resumed when it holds the same rows, else created."""
        if cls.exists(url):
            store = cls(zarr.open_group(url, mode="a"), url)
            if store.meta != meta or not np.array_equal(store.index(), index) or store.dim != dim:
                raise HgkdError(f"{url}: feature cache made for other settings; delete it or give another "
                                "--features-dir")
            return store
        if shard_rows % chunk_rows:
            raise ValueError("shard_rows must be a multiple of chunk_rows")
        n = len(index)
        root = zarr.open_group(url, mode="w")
        crc = [Crc32cCodec()]
        root.create_array("features", shape=(n, dim), dtype="float32", chunks=(chunk_rows, dim),
                          shards=(shard_rows, dim), compressors=CodecSpec(compressor="lz4").compressors(4))
        root.create_array("index", data=np.asarray(index, np.int64), chunks=(shard_rows,), compressors=crc)
        root.create_array("status", shape=(n,), dtype="uint8", chunks=(shard_rows,), fill_value=STATUS_MISSING,
                          compressors=crc)
        root.create_group(SHARDS_GROUP)
        root.attrs[ATTR] = {"format": FORMAT, "format_version": FORMAT_VERSION, "status": "incomplete",
                            "meta": meta, "num_rows": n, "dim": dim, "shard_rows": shard_rows}  # last
        return cls(root, url)

    @classmethod
    def open(cls, url: str) -> "FeatureStore":
        """A complete store for reading; one line when there is none or it is incomplete."""
        if not cls.exists(url):
            raise HgkdError(f"{url}: no hgkd feature cache there")
        store = cls(zarr.open_group(url, mode="r"), url)
        if not store.is_complete:
            raise HgkdError(f"{url}: feature cache is incomplete ({len(store.pending_shards())} of "
                            f"{store.num_shards} shards missing); run the evaluation again to finish it")
        return store

    @staticmethod
    def exists(url: str) -> bool:
        try:
            group = zarr.open_group(url, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return False
        return ATTR in group.attrs

    # ---- geometry -----------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return self.blob["meta"]

    @property
    def num_rows(self) -> int:
        return int(self.blob["num_rows"])

    @property
    def dim(self) -> int:
        return int(self.blob["dim"])

    @property
    def shard_rows(self) -> int:
        return int(self.blob["shard_rows"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    @property
    def is_complete(self) -> bool:
        return self.blob.get("status") == "complete"

    def rows_of_shard(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.num_rows))

    def pending_shards(self) -> list[int]:
        done = {int(name) for name in self.group[SHARDS_GROUP].group_keys()}
        return [s for s in range(self.num_shards) if s not in done]

    def lost_shards(self) -> list[int]:
        """Recorded shards that cannot be read back as written: a ``features`` or ``status`` file
        missing (read as zeros), or a status chunk that fails its crc32c or holds unwritten rows."""
        from zarr.core.sync import sync

        features, status = self.group["features"], self.group["status"]
        pending = set(self.pending_shards())
        done = [s for s in range(self.num_shards) if s not in pending]
        lost = []
        for shard in done:
            keys = [f"{features.path}/{features.metadata.encode_chunk_key((shard, 0))}",
                    f"{status.path}/{status.metadata.encode_chunk_key((shard,))}"]
            if not all(sync(self.group.store.exists(key)) for key in keys):
                lost.append(shard)
                continue
            rows = self.rows_of_shard(shard)
            try:
                written = status[rows.start:rows.stop]
            except ValueError:  # crc32c mismatch
                lost.append(shard)
                continue
            if (written == STATUS_MISSING).any():
                lost.append(shard)
        return lost

    def forget(self, shards: list[int]) -> None:
        """Drop the records of ``shards`` (and the complete mark) so they are written again."""
        for shard in shards:
            del self.group[SHARDS_GROUP][f"{shard:06d}"]
        self.blob = {**self.blob, "status": "incomplete"}
        self.group.attrs[ATTR] = self.blob

    # ---- writing ------------------------------------------------------------------------
    def write_shard(self, shard: int, features_nd: np.ndarray, status_n: np.ndarray) -> None:
        """Both arrays of one whole shard, then its completion record."""
        rows = self.rows_of_shard(shard)
        if features_nd.shape != (len(rows), self.dim) or status_n.shape != (len(rows),):
            raise ValueError(f"shard {shard}: expected {len(rows)} rows of {self.dim} features")
        self.group["features"][rows.start:rows.stop] = features_nd.astype(np.float32, copy=False)
        self.group["status"][rows.start:rows.stop] = status_n.astype(np.uint8, copy=False)
        self.group[SHARDS_GROUP].create_group(f"{shard:06d}", attributes={"rows": [rows.start, rows.stop]},
                                              overwrite=True)

    def finalize(self) -> None:
        """Mark the store complete; refuses while a shard is unrecorded."""
        pending = self.pending_shards()
        if pending:
            raise HgkdError(f"{self.url}: shards {pending[:5]} are not written; the feature cache stays incomplete")
        self.blob = {**self.blob, "status": "complete"}
        self.group.attrs[ATTR] = self.blob

    # ---- reading ------------------------------------------------------------------------
    def index(self) -> np.ndarray:
        return self.group["index"][:]

    def status(self) -> np.ndarray:
        """Per row: ok, undecodable image, or not written; one line naming the cache if damaged."""
        try:
            return self.group["status"][:]
        except ValueError as err:  # crc32c: the cache is damaged, not the images
            raise HgkdError(f"{self.url}: the feature cache's status is damaged ({err}); delete the feature cache "
                            "to recompute it") from None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Features of rows ``start .. stop - 1`` (float32)."""
        return self.take(np.arange(start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Features (float32) of the ascending ``rows``, read one stored chunk at a time into one
        array: memory stays at the result plus one chunk (reading a long range at once makes
        zarr hold every chunk's buffers, and the allocator keeps them)."""
        array = self.group["features"]
        step = array.chunks[0]
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        chunk_of = rows // step
        cuts = np.flatnonzero(np.diff(chunk_of)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
            if hi > lo:
                first = int(chunk_of[lo]) * step
                try:
                    chunk = array[first:min(first + step, self.num_rows)]
                except ValueError as err:  # crc32c: "Stored and computed checksum do not match"
                    raise HgkdError(f"{self.url}: feature rows {first}.. are damaged ({err}); delete the feature "
                                    "cache to recompute it") from None
                out[lo:hi] = chunk[rows[lo:hi] - first]
        return out
