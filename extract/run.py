"""Stage one: run a frozen MIM teacher once over masked views and fill the cache.

Shards are processed in order; a process works on a shard only if it is not yet complete,
belongs to its ``rank`` and its lock can be taken, so re-running the same command resumes,
and several processes on one cache split the shards between them. Batches start at shard
boundaries, so a resumed run computes exactly what an uninterrupted one would.

Growing (issue 12): the same command with a larger ``--views-per-image`` on a complete cache
appends a row block for the new views only (``FeatureCache.grow``) and fills its shards like
any other run: same locks, completion records and resume.

Preemption (issue 21): SIGTERM/SIGUSR1 (``hgkd.preemption``) stop the run at the next batch
boundary. The open shard is submitted if its last batch is in, otherwise dropped (it lives
only in memory: nothing of it is on storage); the shards already submitted are written and
recorded, every lock taken is released, and ``Resumable`` says how far the cache got. The same
command then extracts the missing shards, exactly as after ``kill -9``.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..devices import resolve_device
from ..errors import HgkdError, Resumable
from ..preemption import StopSignals, stop_signals
from ..storage.cache import STATUS_OK, STATUS_SKIPPED, FeatureCache, RowBlock
from ..storage.codecs import encode_tokens
from ..storage.locks import creation_lock
from ..storage.metadata import SKIP_NO_IMAGE, SKIP_UNDECODABLE, CacheMeta
from ..storage.shards import claim_shard, completion_record
from ..version import __version__
from ..data.random_access import RandomAccessSource, open_indexed
from ..data.sources import DataSource, Sample
from .config import ExtractConfig
from .teachers.base import Teacher, create_teacher, sha256_file
from ..data.decoders import DEVICE_DECODERS, check_decoder, decode_on_device, image_hw
from ..data.views import ViewConfig, ViewParams, decode_image, render_crop, render_view, sample_view
from .writer import BackgroundWriter, ShardBuffer

log = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    cache: FeatureCache
    shards_written: list[int]
    views_written: int
    seconds: float
    teacher_seconds: float  # wall time inside the teacher forward (device synchronised)
    complete: bool
    grown_from: int | None = None  # views per image before this run grew the cache (issue 12)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_teacher(cfg: ExtractConfig, device: torch.device) -> Teacher:
    torch.manual_seed(cfg.init_seed)  # only matters without a checkpoint
    teacher = create_teacher(cfg.teacher, checkpoint=cfg.checkpoint, img_size=cfg.view.img_size)
    if teacher.patch_size != cfg.view.patch_size:
        raise HgkdError(f"--teacher {cfg.teacher} has patch size {teacher.patch_size}, views use {cfg.view.patch_size}")
    return teacher.to(device).eval()


def build_meta(cfg: ExtractConfig, teacher: Teacher, source: DataSource) -> CacheMeta:
    """Everything that decides the cache's content (compared on resume)."""
    ckpt = cfg.checkpoint
    num_tokens = teacher.grid_size[0] * teacher.grid_size[1]
    return CacheMeta(
        teacher={
            "name": cfg.teacher, "family": teacher.family,
            "checkpoint_sha256": sha256_file(ckpt) if ckpt else None,
            "init_seed": None if ckpt else cfg.init_seed,
            "embed_dim": teacher.embed_dim, "patch_size": teacher.patch_size,
            "grid": list(teacher.grid_size), "img_size": cfg.view.img_size,
            "outputs_masked_tokens": teacher.outputs_masked_tokens,
            "mean": list(teacher.mean), "std": list(teacher.std),
        },
        view=cfg.view.to_json(),
        dataset=source.describe(),
        storage={
            "codec": cfg.codec.codec, "compressor": cfg.codec.compressor, "clevel": cfg.codec.clevel,
            "shard_views": cfg.shard_views, "num_views": source.num_samples * cfg.view.views_per_image,
            "num_tokens": num_tokens, "dim": teacher.embed_dim,
        },
        software={"hgkd": __version__, "torch": torch.__version__},
    )


def open_or_create(cfg: ExtractConfig, meta: CacheMeta) -> tuple[FeatureCache, int | None]:
    """Create the cache, reopen it for resuming when its settings match exactly, or grow it.

    Returns the cache and, when this call grew it, its views per image before.
    """
    if "://" not in cfg.out:
        try:
            os.makedirs(cfg.out, exist_ok=True)
        except OSError as err:
            raise HgkdError(f"--out {cfg.out}: cannot create the cache directory ({err.strerror})") from None
        if not os.access(cfg.out, os.W_OK):
            raise HgkdError(f"--out {cfg.out}: directory is not writable")
    with creation_lock(cfg.out) if "://" not in cfg.out else nullcontext():
        if not FeatureCache.exists(cfg.out):
            try:
                return FeatureCache.create(cfg.out, meta), None
            except OSError as err:  # disk full, quota, read-only: the half-made cache is not a cache yet
                raise HgkdError(f"--out {cfg.out}: creating the cache failed ({err.strerror or err}); free space "
                                "or fix the storage, then re-run the same command") from None
        cache = FeatureCache.open(cfg.out, mode="r+")
        if not _growth_views(cfg, meta, cache):
            return cache, None
        before = int(cache.meta.view["views_per_image"])
        cache.grow(cfg.view.views_per_image, added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return cache, before


def _growth_views(cfg: ExtractConfig, meta: CacheMeta, cache: FeatureCache) -> int:
    """How many views per image this run appends to an existing cache (0: resume); refuses the rest."""
    diff = meta.differences(cache.meta, growth=True)
    if diff:
        raise HgkdError(
            f"--out {cfg.out} holds a cache made with other settings ({'; '.join(diff[:3])}); "
            "use a new --out or the original settings"
        )
    want, have = cfg.view.views_per_image, int(cache.meta.view["views_per_image"])
    if want < have:
        raise HgkdError(f"--views-per-image {want}: --out {cfg.out} already holds {have} views per image and a "
                        f"cache cannot shrink; pass --views-per-image {have} (runs may use fewer) or a new --out")
    if want > have and not cache.is_complete():
        raise HgkdError(f"--views-per-image {want}: --out {cfg.out} is not complete at {have} views per image; "
                        f"finish it with --views-per-image {have} first, then grow it")
    if want > have and cache.shard_views % (want - have):
        raise HgkdError(f"--views-per-image {want}: the {want - have} new views per image do not divide this "
                        f"cache's --shard-views {cache.shard_views}; grow by a divisor of {cache.shard_views}")
    return want - have


@dataclass
class Prepared:
    """One sample with its K views (rendered, or pending for a device decoder), or the reason it was skipped."""

    sample: Sample
    params: list[ViewParams] = field(default_factory=list)
    views_kchw: torch.Tensor | None = None  # None: rendered on the device from ``sample.data``
    src_hw: tuple[int, int] = (0, 0)
    error: str | None = None
    reason: str | None = None  # SKIP_NO_IMAGE or SKIP_UNDECODABLE when skipped

    def skip(self, err: Exception) -> None:
        """Undecodable/truncated image: skipped and counted."""
        self.params, self.views_kchw, self.error, self.reason = [], None, f"{type(err).__name__}: {err}", SKIP_UNDECODABLE


def prepare_sample(sample: Sample, view_cfg: ViewConfig, view_ids: range | None = None) -> Prepared:
    """Draw views ``view_ids`` (default: all K) of one sample on a worker thread; decode and render
    them there unless the decoder works on the device (then only the header is read, for the size)."""
    if sample.data is None:
        return Prepared(sample, error="sample has no image member", reason=SKIP_NO_IMAGE)
    prepared = Prepared(sample)
    try:
        image = None if view_cfg.decoder in DEVICE_DECODERS else decode_image(sample.data)
        hw = image_hw(sample.data) if image is None else (int(image.shape[1]), int(image.shape[2]))
    except Exception as err:  # noqa: BLE001 - skipped and counted
        prepared.skip(err)
        return prepared
    view_ids = range(view_cfg.views_per_image) if view_ids is None else view_ids
    prepared.params, prepared.src_hw = [sample_view(view_cfg, sample.key, k, hw) for k in view_ids], hw
    if image is not None:
        prepared.views_kchw = torch.stack([render_view(image, p, view_cfg) for p in prepared.params])
    return prepared


def render_on_device(prepared: list[Prepared], view_cfg: ViewConfig, device: torch.device) -> None:
    """Fill ``views_kchw`` of the pending samples with one batched decode on ``device``; a sample
    that cannot be decoded there is skipped like one the CPU cannot decode."""
    pending = [p for p in prepared if p.error is None and p.views_kchw is None]
    if not pending:
        return
    images = decode_on_device([p.sample.data for p in pending], device)
    for p, image in zip(pending, images):
        if isinstance(image, Exception):
            p.skip(image)
            continue
        p.views_kchw = torch.stack([render_crop(image, v.crop_tlhw, v.flip, view_cfg.img_size, view_cfg.interpolation)
                                    for v in p.params])


class Extractor:
    """Teacher forward + encoding of one batch of prepared samples into cache rows."""

    def __init__(self, cfg: ExtractConfig, teacher: Teacher, device: torch.device) -> None:
        self.cfg, self.teacher, self.device = cfg, teacher, device
        self.amp = autocast_dtype(cfg.precision, device)
        self.teacher_seconds = 0.0

    def teacher_outputs(self, views_vchw: torch.Tensor, mask_vn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (V, N, C) float32, valid (V, N), pooled (V, C) L2-normalised."""
        start = time.perf_counter()
        out = self.teacher.targets(views_vchw, mask_vn, full_view=self.cfg.view.teacher_view == "full", amp=self.amp)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.teacher_seconds += time.perf_counter() - start
        return out

    def rows_for(self, prepared: list[Prepared], buffer: ShardBuffer, block: RowBlock) -> None:
        """Run the teacher on a batch and put the block's views of each sample into the shard buffer."""
        k_views = block.views_per_sample
        render_on_device(prepared, self.cfg.view, self.device)
        for p in prepared:
            if p.error is not None:
                fields = {**self._base_fields(p.sample, block), "status": np.full(k_views, STATUS_SKIPPED, np.uint8)}
                buffer.put(block.row(p.sample.index, block.view_start), fields)
                buffer.skipped.append({"key": p.sample.key, "index": p.sample.index, "reason": p.reason,
                                       "error": p.error[:300]})
        ok = [p for p in prepared if p.error is None]
        if not ok:
            return
        mask_vn = torch.from_numpy(np.stack([v.mask_hw.reshape(-1) for p in ok for v in p.params]))
        views_vchw = torch.cat([p.views_kchw.to(self.device) for p in ok])
        buffer.keep_fingerprint([block.row(p.sample.index, block.view_start) + k for p in ok for k in range(k_views)],
                                views_vchw)
        tokens, valid, pooled = self.teacher_outputs(views_vchw, mask_vn)
        encoded = encode_tokens(tokens, self.cfg.codec)
        encoded.update(pooled=pooled.half().cpu().numpy(), valid=valid.cpu().numpy(), mask=mask_vn.numpy())
        for i, p in enumerate(ok):
            fields = {name: arr[i * k_views : (i + 1) * k_views] for name, arr in encoded.items()}
            fields.update(
                self._base_fields(p.sample, block),
                crop=np.array([v.crop_tlhw for v in p.params], np.int32),
                flip=np.array([v.flip for v in p.params]),
                src_hw=np.array([p.src_hw] * k_views, np.int32),
                status=np.full(k_views, STATUS_OK, np.uint8),
            )
            buffer.put(block.row(p.sample.index, block.view_start), fields)

    @staticmethod
    def _base_fields(sample: Sample, block: RowBlock) -> dict[str, np.ndarray]:
        k_views = block.views_per_sample
        return {
            "key": np.array([sample.key] * k_views, dtype=object),
            "index": np.full(k_views, sample.index, np.int64),
            "view_index": np.arange(block.view_start, block.view_stop, dtype=np.int32),
            "label": np.full(k_views, sample.label, np.int32),
        }


def _batched(items: Iterator, n: int) -> Iterator[list]:
    while batch := list(islice(items, n)):
        yield batch


def run_extract(cfg: ExtractConfig) -> ExtractReport:
    """Fill (or resume filling, or grow) the cache at ``cfg.out``; returns what this process did."""
    if cfg.shard_views % cfg.view.views_per_image and not FeatureCache.exists(cfg.out):  # growth: checked on open
        raise HgkdError(f"--shard-views {cfg.shard_views} must be a multiple of --views-per-image {cfg.view.views_per_image}")
    if not 0 <= cfg.rank < cfg.world_size:
        raise HgkdError(f"--rank {cfg.rank} must be in [0, --world-size {cfg.world_size})")
    device = resolve_device(cfg.device, per_rank=True)  # torchrun: cuda:$LOCAL_RANK per process
    check_decoder(cfg.view.decoder, device)
    # the sample index (member offsets, kept between runs) instead of a counting pass over every
    # byte; each decode thread then reads its own samples with os.pread / ranged requests
    source = open_indexed(cfg.data)
    access = RandomAccessSource(source)
    teacher = load_teacher(cfg, device)
    cache, grown_from = open_or_create(cfg, build_meta(cfg, teacher, source))
    extractor = Extractor(cfg, teacher, device)
    writer = BackgroundWriter(cache)
    done = cache.completed_shards()
    bar = tqdm(total=cache.view_rows(), initial=sum(len(cache.shard_rows(s)) for s in done), unit="view",
               desc="extract", disable=not cfg.progress, smoothing=0.1)
    written: list[int] = []
    start = time.perf_counter()
    with stop_signals() as stop:
        with _storage_errors(cfg.out, writer):
            for block in cache.blocks:
                written += _fill_block(cache, block, access, cfg, done, extractor, writer, bar, stop)
                if stop.requested:
                    break
        bar.close()
        if stop.requested:  # the submitted shards are on storage (the writer is closed): say how far it got
            raise _stopped(cfg.out, cache, stop.requested)
    complete = cache.finalize()
    seconds = time.perf_counter() - start
    views = sum(len(cache.shard_rows(s)) for s in written)
    log.info("wrote %d shards (%d views) in %.1fs, %.0f%% of it in the teacher forward; cache complete: %s",
             len(written), views, seconds, 100 * extractor.teacher_seconds / max(seconds, 1e-9), complete)
    return ExtractReport(cache, written, views, seconds, extractor.teacher_seconds, complete, grown_from)


def _stopped(out: str, cache: FeatureCache, signal_name: str) -> Resumable:
    """The one line of a preempted run: views on storage now, out of the cache's rows (issue 21)."""
    views = sum(len(cache.shard_rows(s)) for s in cache.completed_shards())
    return Resumable(f"{out}: {signal_name} after {views} of {cache.view_rows()} views; resumable: run the same "
                     "command again")


def _fill_block(cache: FeatureCache, block: RowBlock, access: RandomAccessSource, cfg: ExtractConfig,
                done: set[int], extractor: Extractor, writer: BackgroundWriter, bar: tqdm,
                stop: StopSignals | None = None) -> list[int]:
    """Write this process's pending shards of one row block; other shards' samples are not read.

    Samples are read, decoded and rendered by ``cfg.workers`` DataLoader processes (one torch
    thread each, their own GIL): in threads, torch's intra-op pool made each small resize up to
    20x slower and the extraction loop shared the GIL with them (issue 20, extraction at 0.12x
    of the bare forward on a GPU). A shard is claimed (its lock taken) when the loader first
    asks for its batches, a little ahead of the extraction loop.

    ``stop`` (issue 21) is polled before each batch: once requested, the open shard is submitted
    when all its rows are in and dropped otherwise, and the locks of the shards claimed but not
    submitted are released, so the next run (or another process) extracts them."""
    shards = cache.shards_of(block)
    todo = [s for s in shards if s % cfg.world_size == cfg.rank and s not in done]
    plan = ShardPlan(cache, block, todo, cfg, done)
    loader = DataLoader(PrepareSamples(access, cfg.view, range(block.view_start, block.view_stop)), sampler=plan,
                        batch_size=None, num_workers=cfg.workers, collate_fn=_as_is,
                        multiprocessing_context="fork" if cfg.workers and os.name == "posix" else None)
    written: list[int] = []
    buffer: ShardBuffer | None = None
    batches = iter(loader)
    for shard, prepared in batches:
        if stop is not None and stop.requested:
            break
        for p in prepared:
            if isinstance(p.views_kchw, np.ndarray):
                p.views_kchw = torch.from_numpy(p.views_kchw)
        if buffer is None or buffer.shard != shard:
            if buffer is not None:
                written.append(_submit(cache, buffer, plan.locks.pop(buffer.shard), writer))
            buffer = ShardBuffer(cache, shard)
        extractor.rows_for(prepared, buffer, block)
        bar.update(len(prepared) * block.views_per_sample)
    if stop is not None and stop.requested:
        del batches  # shuts the loader's workers down: no further shard is claimed
        if buffer is not None and not buffer.missing_rows():  # the open shard's last batch is in: keep it
            written.append(_submit(cache, buffer, plan.locks.pop(buffer.shard), writer))
        plan.release_unsubmitted()
        return written
    if buffer is not None:
        written.append(_submit(cache, buffer, plan.locks.pop(buffer.shard), writer))
    return written


def _submit(cache: FeatureCache, buffer: ShardBuffer, lock, writer: BackgroundWriter) -> int:
    record = completion_record(cache, buffer.shard, buffer.rows, buffer.arrays["status"], buffer.skipped,
                               seconds=time.perf_counter() - buffer.started)
    writer.submit(buffer, record, lock or None)
    return buffer.shard


def _as_is(batch: object) -> object:
    return batch


class ShardPlan(torch.utils.data.Sampler):
    """Yields ``(shard, sample indices)`` batches of the shards this process gets: each shard is
    claimed (lock taken, files of a killed writer removed) before its first batch is yielded."""

    def __init__(self, cache: FeatureCache, block: RowBlock, todo: list[int], cfg: ExtractConfig,
                 done: set[int]) -> None:
        self.cache, self.block, self.todo, self.cfg, self.done = cache, block, todo, cfg, done
        self.locks: dict[int, object] = {}

    def release_unsubmitted(self) -> None:
        """Release the locks of shards claimed but never handed to the writer (a stopped run)."""
        while self.locks:
            _, lock = self.locks.popitem()
            if lock:
                lock.release()

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        cache, block = self.cache, self.block
        per_shard = cache.shard_views // block.views_per_sample
        per_batch = max(1, self.cfg.batch_size // block.views_per_sample)
        first_shard = cache.shards_of(block).start
        for shard in self.todo:
            lock = claim_shard(cache, shard, self.cfg.rank, self.cfg.world_size, self.done)
            if lock is False:
                continue
            if cache.clear_shard(shard):  # files of a writer killed mid-shard: never write into a torn file
                log.info("shard %d: removed the files an unfinished write left", shard)
            self.locks[shard] = lock
            first = (shard - first_shard) * per_shard
            for batch in _batched(iter(range(first, min(first + per_shard, block.num_samples))), per_batch):
                yield shard, batch


class PrepareSamples(torch.utils.data.Dataset):
    """``dataset[(shard, indices)]`` -> ``(shard, [Prepared])``: read, draw, and (CPU decoder)
    decode and render each sample, in a loader worker."""

    def __init__(self, access: RandomAccessSource, view_cfg: ViewConfig, view_ids: range) -> None:
        self.access, self.view_cfg, self.view_ids = access, view_cfg, view_ids

    def __getitem__(self, item: tuple[int, list[int]]) -> tuple[int, list[Prepared]]:
        shard, indices = item
        prepared = [read_and_prepare(self.access, i, self.view_cfg, self.view_ids) for i in indices]
        for p in prepared:
            if p.views_kchw is not None:  # rendered: the bytes need not cross back to the extraction loop
                p.sample = replace(p.sample, data=None)
                # numpy crosses the worker pipe by value; a torch tensor would go through /dev/shm files,
                # whose failure (a small shm in a container, a file-size limit) hangs the loader
                p.views_kchw = p.views_kchw.numpy()
        return shard, prepared


@contextmanager
def _storage_errors(out: str, writer: BackgroundWriter) -> Iterator[None]:
    """Disk full / quota / I/O errors -> one clear line; the failed shard stays unrecorded."""
    try:
        yield
        writer.close()
    except OSError as err:
        raise HgkdError(f"--out {out}: writing the cache failed ({err.strerror or err}); free space or fix "
                        "the storage, then re-run the same command to resume") from None


def read_and_prepare(access: RandomAccessSource, index: int, view_cfg: ViewConfig, view_ids: range) -> Prepared:
    """Read sample ``index``'s bytes, then prepare it."""
    sample = Sample(index, access.keys[index], access.read(index), int(access.labels[index]))
    return prepare_sample(sample, view_cfg, view_ids)
