"""`FeatureCache`: the teacher-token cache as a sharded Zarr v3 group.

One row per view. Every per-view array is split into the same *cache shards* of
``shard_views`` rows: ``tokens`` (and its codec's side arrays) uses Zarr's sharding codec
with one view per inner chunk (random single-view reads decode one view), the small arrays
use one chunk per cache shard. A writer therefore owns whole files (see ``locks.py``), writes
each array once per shard, and only then records the shard as complete in
``shards/<index>`` (a Zarr group whose attributes are the completion record). Readers and
``verify`` trust only rows of completed shards.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import zarr
import zarr.storage

from ..errors import HgkdError
from .codecs import CodecSpec, decode_tokens
from .metadata import FORMAT, CacheMeta

log = logging.getLogger(__name__)

ATTR = "hgkd"
SHARDS_GROUP = "shards"
STATUS_MISSING, STATUS_OK, STATUS_SKIPPED = 0, 1, 2


@dataclass(frozen=True)
class ArraySpec:
    """One per-view array: shape after the view axis and dtype."""

    row_shape: tuple[int, ...]
    dtype: Any
    sharded: bool = False  # inner chunk of one view inside shards (large arrays)


def view_arrays(meta: CacheMeta) -> dict[str, ArraySpec]:
    """Every per-view array of a cache with these settings."""
    st = meta.storage
    n_tok, dim = st["num_tokens"], st["dim"]
    codec = CodecSpec(st["codec"], st["compressor"], st["clevel"])
    arrays = {"tokens": ArraySpec((n_tok, dim), codec.token_dtype, sharded=True)}
    for name, (shape, dtype) in codec.aux_arrays(n_tok, dim).items():
        arrays[name] = ArraySpec(shape, dtype)
    arrays.update(
        pooled=ArraySpec((dim,), "float16"),  # mean of valid tokens, L2-normalised
        mask=ArraySpec((n_tok,), "bool"),  # True = patch hidden from the view
        valid=ArraySpec((n_tok,), "bool"),  # True = teacher produced this token
        key=ArraySpec((), str),  # sample key in the source data set
        index=ArraySpec((), "int64"),  # sample position in the source data set
        view_index=ArraySpec((), "int32"),  # k of the K views of that sample
        src_hw=ArraySpec((2,), "int32"),  # decoded source image height, width
        crop=ArraySpec((4,), "int32"),  # top, left, height, width in source pixels
        flip=ArraySpec((), "bool"),  # horizontal flip after the crop
        label=ArraySpec((), "int32"),  # class id when the source has one, else -1
        status=ArraySpec((), "uint8"),  # 0 missing, 1 ok, 2 skipped (undecodable image)
    )
    return arrays


class FeatureCache:
    """A teacher-token cache opened by local path or fsspec URL."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        self.group = group
        self.url = url
        blob = group.attrs.get(ATTR)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise HgkdError(f"{url} is a Zarr group but not an hgkd cache (no '{ATTR}' metadata)")
        self.meta = CacheMeta.from_json(blob)
        self.codec = CodecSpec(self.meta.storage["codec"], self.meta.storage["compressor"], self.meta.storage["clevel"])
        self.arrays = view_arrays(self.meta)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, meta: CacheMeta, storage_options: dict | None = None) -> "FeatureCache":
        """Create an empty cache (all shards pending) with the given settings."""
        root = zarr.open_group(url, mode="a", storage_options=storage_options)
        st = meta.storage
        n_views, shard_views = st["num_views"], st["shard_views"]
        codec = CodecSpec(st["codec"], st["compressor"], st["clevel"])
        for name, spec in view_arrays(meta).items():
            shape = (n_views, *spec.row_shape)
            itemsize = 1 if spec.dtype in (str, "bool") else np.dtype(spec.dtype).itemsize
            common = dict(
                name=name,
                shape=shape,
                dtype=spec.dtype,
                compressors=codec.compressors(itemsize) if spec.dtype is not str else "auto",
                overwrite=True,
            )
            if spec.sharded:
                root.create_array(chunks=(1, *spec.row_shape), shards=(shard_views, *spec.row_shape), **common)
            else:
                root.create_array(chunks=(shard_views, *spec.row_shape), **common)
        root.create_group(SHARDS_GROUP, overwrite=True)
        root.attrs[ATTR] = meta.to_json()  # last: a group without it is not a cache
        return cls(root, url)

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "FeatureCache":
        """Open an existing cache; clear error if ``url`` holds none."""
        try:
            group = zarr.open_group(url, mode=mode, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as err:
            raise HgkdError(f"{url}: no hgkd cache there ({type(err).__name__}); run 'hgkd-extract run' first") from None
        return cls(group, url)

    @staticmethod
    def exists(url: str, storage_options: dict | None = None) -> bool:
        try:
            group = zarr.open_group(url, mode="r", storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return False
        return ATTR in group.attrs

    # ---- geometry ---------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return int(self.meta.storage["num_views"])

    @property
    def shard_views(self) -> int:
        return int(self.meta.storage["shard_views"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_views // self.shard_views)

    def shard_rows(self, shard: int) -> range:
        start = shard * self.shard_views
        return range(start, min(start + self.shard_views, self.num_views))

    @property
    def local_dir(self) -> str | None:
        """Directory of the store when it is on the local file system (locks need one)."""
        store = self.group.store
        return str(store.root) if isinstance(store, zarr.storage.LocalStore) else None

    # ---- completion records -------------------------------------------------------------
    def completed_shards(self) -> set[int]:
        with warnings.catch_warnings():  # a writer killed mid-record leaves an empty folder: not complete
            warnings.filterwarnings("ignore", "Object at .* is not recognized", category=UserWarning)
            return {int(name) for name in self.group[SHARDS_GROUP].group_keys()}

    def shard_record(self, shard: int) -> dict[str, Any] | None:
        try:
            return dict(self.group[f"{SHARDS_GROUP}/{shard:06d}"].attrs)
        except KeyError:
            return None

    def is_complete(self) -> bool:
        return self.meta.status == "complete"

    # ---- writing ----------------------------------------------------------------------
    def write_shard(self, shard: int, rows: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        """Write every array of one whole shard, then its completion record (in that order).

        The caller must own the shard (``ShardLock``); a shard is written in one call per
        array so Zarr never read-modify-writes a shard file.
        """
        span = self.shard_rows(shard)
        missing = set(self.arrays) - set(rows)
        if missing:
            raise ValueError(f"shard {shard}: arrays missing from the write: {sorted(missing)}")
        for name, values in rows.items():
            if len(values) != len(span):
                raise ValueError(f"shard {shard}: {name} has {len(values)} rows, expected {len(span)}")
            # write_empty_chunks is a runtime setting in zarr 3, not stored: set it on every
            # write so an all-fill chunk still lands on storage (verify checks every file).
            self.group[name].with_config({"write_empty_chunks": True})[span.start : span.stop] = values
        self.group[SHARDS_GROUP].create_group(f"{shard:06d}", attributes=record, overwrite=True)

    def finalize(self) -> bool:
        """Mark the cache complete if every shard is; returns whether it is complete."""
        done = self.completed_shards()
        if len(done) < self.num_shards:
            return False
        skipped: list[dict[str, Any]] = []
        for shard in sorted(done):
            skipped.extend((self.shard_record(shard) or {}).get("skipped", []))
        self.meta.status, self.meta.skipped = "complete", skipped
        self.group.attrs[ATTR] = self.meta.to_json()
        return True

    # ---- reading ----------------------------------------------------------------------
    def read(self, rows: Iterable[int], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Raw stored arrays for the given rows (any order, batched per array)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        wanted = list(names) if names is not None else list(self.arrays)
        return {name: self.group[name].get_orthogonal_selection((idx,)) for name in wanted}

    def reader(self, threads: int = 2):
        """A :class:`~hgkd.storage.reader.ShardReader` on this cache (fast path for complete shards).

        ``read`` goes through zarr-python (tens of views/s for ViT-sized rows); training and
        anything reading many rows should use this instead.
        """
        from .reader import ShardReader  # reader builds on this module

        return ShardReader(self, threads=threads)

    def read_tokens(self, rows: Iterable[int]) -> torch.Tensor:
        """Decoded float32 teacher tokens (B, N, C) for the given rows."""
        names = ["tokens", *self.codec.aux_arrays(1, 1)]
        return decode_tokens(self.read(rows, names), self.codec)

    def nbytes_stored(self) -> int:
        """Bytes on storage of all arrays (for ``info``)."""
        return sum(int(self.group[name].nbytes_stored()) for name in self.arrays)
