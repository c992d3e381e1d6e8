"""A cache's pixel fingerprint (issue 20, item 2): the first few views of shard 0 exactly as
the teacher saw them (uint8, after decode, crop, resize and flip), with their rows.

Decoders differ by a few levels (nvJPEG vs libjpeg-turbo, library versions), which would
silently feed the student other pixels than the teacher's. Stage two re-renders these rows
with its own decoder and compares before training (``hgkd.distill.pixel_check``). The writer
of shard 0 stores them (again, identically, when a repaired shard 0 is re-extracted); caches
made before this have none.
"""
from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .cache import FeatureCache

GROUP = "fingerprint"
MAX_VIEWS = 4


def write_fingerprint(cache: FeatureCache, rows: np.ndarray, views_nchw: np.ndarray) -> None:
    """Store ``views_nchw`` (uint8) of cache rows ``rows`` (whole arrays: nothing is appended)."""
    group = cache.group.require_group(GROUP)
    for name, values in (("views", np.ascontiguousarray(views_nchw, np.uint8)), ("rows", np.asarray(rows, np.int64))):
        array = group.create_array(name=name, shape=values.shape, dtype=values.dtype, chunks=values.shape or (1,),
                                   compressors=[ZstdCodec(level=3), Crc32cCodec()], overwrite=True)
        array[...] = values


def read_fingerprint(cache: FeatureCache) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, uint8 views (n, 3, S, S)) or None when the cache has no fingerprint."""
    try:
        group = cache.group[GROUP]
        rows, views = group["rows"][...], group["views"][...]
    except (KeyError, FileNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    return np.asarray(rows, np.int64), np.asarray(views, np.uint8)
