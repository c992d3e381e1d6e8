"""`FeatureCache`: the teacher-token cache as a sharded Zarr v3 group.

One row per view. Every per-view array is split into the same *cache shards* of
``shard_views`` rows: ``tokens`` (and its codec's side arrays) uses Zarr's sharding codec
with one view per inner chunk (random single-view reads decode one view), the small arrays
use one chunk per cache shard. A writer therefore owns whole files (see ``locks.py``), writes
each array once per shard, and only then records the shard as complete in
``shards/<index>`` (a Zarr group whose attributes are the completion record). Readers and
``verify`` trust only rows of completed shards.

Growing a cache (issue 12) appends a :class:`RowBlock` of rows for the new views of every
sample: the arrays are resized (no existing file changes) and the block starts at the next
shard boundary, so every shard belongs to one block and new shards are new files. When the
last old shard was partial, the rows between its end and the new block are padding: never
written, status 0 (``STATUS_MISSING``), outside every block.

Damaged metadata (issue 21): a ``zarr.json`` that is not valid UTF-8 JSON, or does not describe
what the cache's settings say, is treated as a missing one. The root's is one line saying the
cache must be extracted again (nothing else holds its settings); an array's or the ``shards``
group's is one line pointing at ``hgkd-extract repair``, which re-creates it; a shard's
completion record is read as absent (the shard is unfinished and extracted again).
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Iterable

import numpy as np
import torch
import zarr
import zarr.storage
from zarr.codecs import Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..errors import HgkdError
from ..remote import remote_errors
from .codecs import CodecSpec, decode_tokens
from .metadata import FORMAT, CacheMeta, skip_reason

log = logging.getLogger(__name__)

ATTR = "hgkd"
SHARDS_GROUP = "shards"
STATUS_MISSING, STATUS_OK, STATUS_SKIPPED = 0, 1, 2
# What reading a damaged zarr.json raises: JSONDecodeError and UnicodeDecodeError are ValueErrors, and
# zarr's own parsing raises ValueError (bad node type, data type, codec), KeyError or TypeError (a key gone).
METADATA_ERRORS = (ValueError, KeyError, TypeError)
RECORD_READS = 32  # completion records read at once (over HTTP, each is a request)


def damage_reason(err: BaseException) -> str:
    """``JSONDecodeError: Expecting ',' delimiter: line 3 column 5``: what is wrong, in one short line."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:100]}" if text else type(err).__name__


def root_damaged(url: str, reason: str) -> str:
    """The line for a cache whose root metadata cannot be read (issue 21)."""
    return (f"{url.rstrip('/')}/zarr.json: the cache's own metadata is damaged ({reason}); nothing else holds its "
            f"settings, so it cannot be repaired: delete {url} and re-run the 'hgkd-extract run' command that made it")


def _open_root(url: str, mode: str, storage_options: dict | None) -> zarr.Group | None:
    """The cache's root group, None when ``url`` holds no Zarr group; one line for a damaged
    ``zarr.json`` or a store that does not answer."""
    try:
        return zarr.open_group(url, mode=mode, storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    except remote_errors() as err:  # a URL whose store does not answer
        raise HgkdError(f"{url}: cannot reach the cache ({type(err).__name__}: {err}); check the URL and "
                        f"the network") from None
    except METADATA_ERRORS as err:
        raise HgkdError(root_damaged(url, damage_reason(err))) from None


@dataclass(frozen=True)
class RowBlock:
    """Rows ``first_row ..`` hold views ``view_start .. view_stop - 1`` of every sample, image-major."""

    view_start: int
    view_stop: int
    first_row: int
    num_samples: int
    added: str | None = None  # UTC time of the growth step (None for the first block)

    @property
    def views_per_sample(self) -> int:
        return self.view_stop - self.view_start

    @property
    def rows(self) -> range:
        return range(self.first_row, self.first_row + self.num_samples * self.views_per_sample)

    def row(self, index: int, view: int) -> int:
        """Cache row of view ``view`` of sample ``index``."""
        return self.first_row + index * self.views_per_sample + view - self.view_start

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sample index, view index) of each row of this block."""
        index, k = np.divmod(np.asarray(rows, np.int64) - self.first_row, self.views_per_sample)
        return index, k + self.view_start

    def to_json(self) -> dict[str, Any]:
        return {"views": [self.view_start, self.view_stop], "rows": [self.rows.start, self.rows.stop],
                "added": self.added}

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> "RowBlock":
        (v0, v1), (r0, r1) = blob["views"], blob["rows"]
        return cls(v0, v1, r0, (r1 - r0) // (v1 - v0), blob.get("added"))


@dataclass(frozen=True)
class ViewArray:
    """One per-view array: shape after the view axis and dtype."""

    row_shape: tuple[int, ...]
    dtype: Any
    sharded: bool = False  # inner chunk of one view inside shards (large arrays)


def view_arrays(meta: CacheMeta) -> dict[str, ViewArray]:
    """Every per-view array of a cache with these settings."""
    st = meta.storage
    n_tok, dim = st["num_tokens"], st["dim"]
    codec = CodecSpec(st["codec"], st["compressor"], st["clevel"])
    arrays = {"tokens": ViewArray((n_tok, dim), codec.token_dtype, sharded=True)}
    for name, (shape, dtype) in codec.aux_arrays(n_tok, dim).items():
        arrays[name] = ViewArray(shape, dtype)
    arrays.update(
        pooled=ViewArray((dim,), "float16"),  # mean of valid tokens, L2-normalised
        mask=ViewArray((n_tok,), "bool"),  # True = patch hidden from the view
        valid=ViewArray((n_tok,), "bool"),  # True = teacher produced this token
        key=ViewArray((), str),  # sample key in the source data set
        index=ViewArray((), "int64"),  # sample position in the source data set
        view_index=ViewArray((), "int32"),  # k of the K views of that sample
        src_hw=ViewArray((2,), "int32"),  # decoded source image height, width
        crop=ViewArray((4,), "int32"),  # top, left, height, width in source pixels
        flip=ViewArray((), "bool"),  # horizontal flip after the crop
        label=ViewArray((), "int32"),  # class id when the source has one, else -1
        status=ViewArray((), "uint8"),  # 0 missing/padding, 1 ok, 2 skipped (no image or undecodable)
    )
    return arrays


def has_checksum(array: zarr.Array) -> bool:
    """Whether every stored chunk (and shard index) of ``array`` carries a crc32c."""
    codecs = array.metadata.codecs
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        inner = codecs[0]
        return any(isinstance(c, Crc32cCodec) for c in inner.codecs) and any(
            isinstance(c, Crc32cCodec) for c in inner.index_codecs)
    return any(isinstance(c, Crc32cCodec) for c in codecs)


def _create_array(root: zarr.Group, meta: CacheMeta, name: str, overwrite: bool) -> zarr.Array:
    """One per-view array with the cache's layout; ``overwrite=False`` keeps chunk files already there."""
    st = meta.storage
    spec = view_arrays(meta)[name]
    codec = CodecSpec(st["codec"], st["compressor"], st["clevel"])
    itemsize = 1 if spec.dtype in (str, "bool") else np.dtype(spec.dtype).itemsize
    common = dict(name=name, shape=(st["num_views"], *spec.row_shape), dtype=spec.dtype,
                  compressors=codec.compressors(itemsize), overwrite=overwrite)  # all end in crc32c (issue 11)
    if spec.sharded:
        return root.create_array(chunks=(1, *spec.row_shape), shards=(st["shard_views"], *spec.row_shape), **common)
    return root.create_array(chunks=(st["shard_views"], *spec.row_shape), **common)


class FeatureCache:
    """A teacher-token cache opened by local path or fsspec URL.

    Opening refuses a cache whose array (or ``shards`` group) metadata is gone or damaged (one
    line naming it), unless ``require_arrays=False`` (``hgkd-extract repair``, which re-creates it).
    """

    def __init__(self, group: zarr.Group, url: str, require_arrays: bool = True) -> None:
        self.group = group
        self.url = url
        blob = group.attrs.get(ATTR)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise HgkdError(f"{url} is a Zarr group but not an hgkd cache (no '{ATTR}' metadata)")
        try:
            self.meta = CacheMeta.from_json(blob)
            st = self.meta.storage
            self.codec = CodecSpec(st["codec"], st["compressor"], st["clevel"])
            self.arrays = view_arrays(self.meta)
            self.blocks  # noqa: B018 - parsed here, so that a damaged growth record is caught on open
        except (*METADATA_ERRORS, HgkdError) as err:  # parsed as JSON, but not the settings of a cache
            raise HgkdError(root_damaged(url, damage_reason(err))) from None
        problems = self.metadata_problems()
        if problems and require_arrays:
            raise HgkdError(self._damage_line(problems))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, meta: CacheMeta, storage_options: dict | None = None) -> "FeatureCache":
        """Create an empty cache (all shards pending) with the given settings."""
        root = zarr.open_group(url, mode="a", storage_options=storage_options)
        for name in view_arrays(meta):
            _create_array(root, meta, name, overwrite=True)
        root.create_group(SHARDS_GROUP, overwrite=True)
        k_views = int(meta.view["views_per_image"])
        first = RowBlock(0, k_views, 0, int(meta.storage["num_views"]) // k_views)
        root.attrs[ATTR] = replace(meta, blocks=[first.to_json()]).to_json()  # last: without it, not a cache
        return cls(root, url)

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None,
             require_arrays: bool = True) -> "FeatureCache":
        """Open an existing cache; one line if ``url`` holds none, or its metadata is gone or damaged."""
        group = _open_root(url, mode, storage_options)
        if group is None:
            raise HgkdError(f"{url}: no hgkd cache there; run 'hgkd-extract run' first")
        return cls(group, url, require_arrays)

    @staticmethod
    def exists(url: str, storage_options: dict | None = None) -> bool:
        """Whether ``url`` holds a cache; a damaged root ``zarr.json`` is one line, not a missing cache."""
        group = _open_root(url, "r", storage_options)
        return group is not None and ATTR in group.attrs

    # ---- metadata of the arrays and the shards group (issue 21) ---------------------------
    def metadata_problems(self) -> dict[str, str]:
        """Node -> ``"missing"``, or what is wrong with it, for every array and the ``shards`` group whose
        ``zarr.json`` is gone, unreadable, or at odds with the cache's settings (chunk files are not read)."""
        problems = {name: self._node_problem(name) for name in [*self.arrays, SHARDS_GROUP]}
        return {name: problem for name, problem in problems.items() if problem}

    def _node_problem(self, name: str) -> str | None:
        try:
            node = self.group[name]
        except KeyError:  # no zarr.json, or one whose keys were damaged
            if not sync(self.group.store.exists(f"{name}/zarr.json")):
                return "missing"
            return "not Zarr metadata"
        except METADATA_ERRORS as err:
            return damage_reason(err)
        if name == SHARDS_GROUP:
            return None if isinstance(node, zarr.Group) else "not a group"
        if not isinstance(node, zarr.Array):
            return "not an array"
        row_shape, outer = self.arrays[name].row_shape, (self.shard_views, *self.arrays[name].row_shape)
        # rows: at least the cache's (a growth step killed after resizing leaves more, issue 12)
        files = tuple(node.shards or node.chunks)
        if tuple(node.shape[1:]) != row_shape or node.shape[0] < self.num_views or files != outer:
            return (f"shape {tuple(node.shape)} in files of {files}, the cache's "
                    f"settings say {(self.num_views, *row_shape)} in files of {outer}")
        return None

    def _damage_line(self, problems: dict[str, str]) -> str:
        name, problem = next(iter(problems.items()))
        what = f"array '{name}'" if name in self.arrays else f"the shard records' group '{name}'"
        state = "is missing (its zarr.json is gone" if problem == "missing" else \
            f"has damaged metadata ({name}/zarr.json: {problem}"
        others = list(problems)[1:]
        return (f"{self.url}: {what} {state}{f'; also {others}' if others else ''}); the cache is damaged: "
                f"run 'hgkd-extract repair {self.url}'")

    def restore_metadata(self) -> list[str]:
        """Re-create the lost or damaged metadata of arrays and the ``shards`` group from the cache's
        settings; chunk files and completion records on storage are kept."""
        problems = self.metadata_problems()
        for name, problem in problems.items():
            if problem != "missing":
                sync(self.group.store.delete(f"{name}/zarr.json"))
            if name == SHARDS_GROUP:
                self.group.create_group(SHARDS_GROUP, overwrite=False)
            else:
                _create_array(self.group, self.meta, name, overwrite=False)
        return list(problems)

    def unchecked_arrays(self) -> list[str]:
        """Arrays stored without a crc32c checksum (``key`` in caches made before issue 11)."""
        return [name for name in self.arrays if not has_checksum(self.group[name])]

    # ---- geometry ---------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        """Rows of every per-view array: the views plus any padding between growth blocks."""
        return int(self.meta.storage["num_views"])

    @property
    def shard_views(self) -> int:
        return int(self.meta.storage["shard_views"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_views // self.shard_views)

    @property
    def blocks(self) -> list[RowBlock]:
        """The cache's row blocks in row order (one unless it was grown, issue 12)."""
        if self.meta.blocks:
            return [RowBlock.from_json(b) for b in self.meta.blocks]
        k_views = int(self.meta.view["views_per_image"])  # made before growth existed: one block
        return [RowBlock(0, k_views, 0, self.num_views // k_views)]

    def block_of_shard(self, shard: int) -> RowBlock:
        start = shard * self.shard_views
        return next(b for b in reversed(self.blocks) if b.first_row <= start)

    def shard_rows(self, shard: int) -> range:
        """Rows of the views in one shard (a block's last shard may end early: padding follows)."""
        start = shard * self.shard_views
        return range(start, min(start + self.shard_views, self.block_of_shard(shard).rows.stop))

    def shards_of(self, block: RowBlock) -> range:
        return range(block.first_row // self.shard_views, -(-block.rows.stop // self.shard_views))

    @property
    def local_dir(self) -> str | None:
        """Directory of the store when it is on the local file system (locks need one)."""
        store = self.group.store
        return str(store.root) if isinstance(store, zarr.storage.LocalStore) else None

    # ---- completion records -------------------------------------------------------------
    def completed_shards(self) -> set[int]:
        """Shards with a readable completion record. A writer killed mid-record leaves an empty
        folder, or a torn ``zarr.json``: either way, not complete."""
        names = [name.rstrip("/") for name in self._list(SHARDS_GROUP) if name.rstrip("/").isdigit()]  # HTTP: "000001/"
        records = sync(self._read_records([f"{SHARDS_GROUP}/{name}/zarr.json" for name in names]))
        return {int(name) for name, record in zip(names, records) if isinstance(record, dict)}

    def shard_record(self, shard: int) -> dict[str, Any] | None:
        """The shard's completion record; None when it has none or it is damaged (read as none)."""
        record = self.record_state(shard)
        return record if isinstance(record, dict) else None

    def record_state(self, shard: int) -> dict[str, Any] | str | None:
        """The completion record of ``shard``, None when there is none, or why it cannot be read."""
        return sync(self._read_records([f"{SHARDS_GROUP}/{shard:06d}/zarr.json"]))[0]

    def _list(self, prefix: str) -> list[str]:
        async def names() -> list[str]:
            return [name async for name in self.group.store.list_dir(prefix)]

        return sync(names())

    async def _read_records(self, keys: list[str]) -> list[dict[str, Any] | str | None]:
        """Each record's attributes, None (no file) or the reason it is damaged, ``RECORD_READS`` at a time."""
        limit = asyncio.Semaphore(RECORD_READS)
        prototype = default_buffer_prototype()

        async def read(key: str) -> dict[str, Any] | str | None:
            async with limit:
                raw = await self.group.store.get(key, prototype=prototype)
            if raw is None:
                return None
            try:
                doc = json.loads(raw.to_bytes().decode("utf-8"))
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                return damage_reason(err)
            if not isinstance(doc, dict) or doc.get("node_type") != "group" \
                    or not isinstance(doc.get("attributes"), dict):
                return "not a group's metadata"
            return doc["attributes"]

        return list(await asyncio.gather(*(read(key) for key in keys)))

    def shard_file_key(self, name: str, shard: int) -> str:
        """Store key of array ``name``'s file for cache shard ``shard`` (one file per array and shard)."""
        array = self.group[name]
        coords = (shard,) + (0,) * (array.ndim - 1)
        return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"

    def has_shard_file(self, name: str, shard: int) -> bool:
        return bool(sync(self.group.store.exists(self.shard_file_key(name, shard))))

    def clear_shard(self, shard: int) -> list[str]:
        """Delete a shard's completion record, then its array files; returns the arrays that had one.

        The next ``hgkd-extract run`` writes the shard afresh. The caller holds the shard's lock.
        """
        sync(self.group.store.delete_dir(f"{SHARDS_GROUP}/{shard:06d}"))  # first: readers stop trusting it
        had = [name for name in self.arrays if self.has_shard_file(name, shard)]
        for name in had:
            sync(self.group.store.delete(self.shard_file_key(name, shard)))
        return had

    def is_complete(self) -> bool:
        return self.meta.status == "complete"

    # ---- growth (issue 12) --------------------------------------------------------------
    def grow(self, views_per_image: int, added: str) -> RowBlock:
        """Append a block for views ``K .. views_per_image - 1`` of every sample; all shards stay.

        The new block starts at the next shard boundary, so no existing shard file is
        touched. Arrays are resized first and the metadata written last: a process killed
        in between leaves a cache that still reads as the old one, and growing again
        resizes to the same shape. The caller holds the cache's creation lock.
        """
        old = self.blocks
        last = old[-1]
        if views_per_image <= last.view_stop:
            raise ValueError(f"cannot grow a cache of {last.view_stop} views per image to {views_per_image}")
        first_row = -(-self.num_views // self.shard_views) * self.shard_views
        block = RowBlock(last.view_stop, views_per_image, first_row, last.num_samples, added)
        for name, spec in self.arrays.items():
            self.group[name].resize((block.rows.stop, *spec.row_shape))
        self.meta.blocks = [b.to_json() for b in old] + [block.to_json()]  # fingerprint: first block
        self.meta.view["views_per_image"] = views_per_image
        self.meta.storage["num_views"] = block.rows.stop
        self.meta.status = "incomplete"
        self.group.attrs[ATTR] = self.meta.to_json()
        log.info("grew %s to %d views per image: rows %d-%d hold views %d-%d", self.url, views_per_image,
                 block.rows.start, block.rows.stop - 1, block.view_start, block.view_stop - 1)
        return block

    def view_rows(self) -> int:
        """Rows that hold a view (all blocks; padding between blocks left out)."""
        return sum(len(b.rows) for b in self.blocks)

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
        self.meta.status, self.meta.skipped = "complete", self._skipped(self._records(done))
        self.group.attrs[ATTR] = self.meta.to_json()
        return True

    def _records(self, shards: Iterable[int]) -> list[dict[str, Any]]:
        return [r for r in (self.shard_record(s) for s in sorted(shards)) if r is not None]

    @staticmethod
    def _skipped(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Skipped samples, once each (a skipped sample is recorded once per row block)."""
        skipped: dict[int, dict[str, Any]] = {}
        for record in records:
            for entry in record.get("skipped", []):
                skipped.setdefault(int(entry["index"]), entry)
        return list(skipped.values())

    def cost_summary(self) -> dict[str, Any]:
        """What the cache cost so far (issues 12, 22): teacher forwards, stored bytes, skips by reason,
        extraction seconds.

        ``teacher_forwards`` counts the views extracted (ok rows of completed shards; a skipped
        sample costs none); ``bytes_per_view`` is the stored bytes of every array over them.
        """
        done = self.completed_shards()
        records = self._records(done)
        forwards = sum(int(r.get("num_ok", 0)) for r in records)
        timed = [r["seconds"] for r in records if r.get("seconds") is not None]
        stored = self.nbytes_stored()
        reasons: dict[str, int] = {}
        for entry in self._skipped(records):
            reasons[skip_reason(entry)] = reasons.get(skip_reason(entry), 0) + 1
        return {"shards_done": len(done), "num_shards": self.num_shards, "teacher_forwards": forwards,
                "views_skipped": sum(int(r.get("num_skipped", 0)) for r in records), "bytes_stored": stored,
                "bytes_per_view": stored / forwards if forwards else None, "skipped_samples": reasons,
                # process-seconds of extraction over the shards that recorded them (None: made before issue 22)
                "extraction_seconds": sum(timed) if timed and len(timed) == len(records) else None,
                "blocks": [b.to_json() for b in self.blocks]}

    # ---- reading ----------------------------------------------------------------------
    def read(self, rows: Iterable[int], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Raw stored arrays for the given rows (any order, batched per array)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        wanted = list(names) if names is not None else list(self.arrays)
        return {name: self.group[name].get_orthogonal_selection((idx,)) for name in wanted}

    def read_tokens(self, rows: Iterable[int]) -> torch.Tensor:
        """Decoded float32 teacher tokens (B, N, C) for the given rows."""
        names = ["tokens", *self.codec.aux_arrays(1, 1)]
        return decode_tokens(self.read(rows, names), self.codec)

    def nbytes_stored(self) -> int:
        """Bytes on storage of all arrays (for ``info``)."""
        return sum(int(self.group[name].nbytes_stored()) for name in self.arrays)
