"""Stage-two inputs: the exact views the teacher saw, paired with its cached tokens.

``CacheViewDataset[rows]`` returns a whole batch: it reads the rows' teacher outputs from
the cache in one batched call, fetches each row's source image by sample index, and
re-renders the stored view (crop, flip) with ``hgkd.data.views`` - the same code the
extractor used - so the student sees the teacher's pixels exactly. The teacher never runs.

An epoch is one pass over the images (issue 12): in epoch e image i shows view ``e mod K``
of its K views. ``ChunkAwareBatchSampler`` draws each epoch's images so that each batch
touches a few cache shards only; ``ViewCycleSampler`` does the same for views drawn on the
fly (online teacher, supervised baselines).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import HgkdError
from ..remote import take_retries
from ..data.random_access import RandomAccessSource, open_indexed, open_random_access
from ..data.sources import same_data
from ..data.decoders import DEVICE_DECODERS, PendingViews
from ..data.views import ViewConfig, decode_image, render_crop, render_view, sample_view
from ..data.views import student_mask as draw_student_mask
from ..storage.cache import STATUS_OK, FeatureCache
from ..storage.codecs import CodecSpec, decode_token_tensors, token_tensors
from ..storage.reader import ShardReader

@dataclass
class Batch:
    """One training batch; ``images`` are uint8, everything else float/bool tensors.

    A loader worker may leave two things to the device (issue 20): the pixels of a device
    decoder's views (``pending``) and the decoding of the stored tokens (``token_arrays``,
    e.g. int8 + scales); :meth:`ready` makes ``images`` and ``tokens`` where the batch is.
    """

    rows: torch.Tensor  # (B,) cache rows
    images: torch.Tensor | None  # (B, 3, S, S) uint8, exactly the teacher's view (None: pending)
    visible: torch.Tensor  # (B, gh, gw) bool, True = patch shown
    tokens: torch.Tensor | None = None  # (B, N, C) float32 teacher tokens (None: online teacher or token_arrays)
    valid: torch.Tensor | None = None  # (B, N) bool, teacher produced this token
    pooled: torch.Tensor | None = None  # (B, C) float32 pooled teacher embedding
    labels: torch.Tensor | None = None  # (B,) int64 class labels (supervised methods)
    indices: torch.Tensor | None = None  # (B,) int64 sample indices (instance-level methods)
    pending: PendingViews | None = None  # views a device decoder renders in ready()
    token_arrays: dict[str, torch.Tensor] | None = None  # stored (encoded) tokens, decoded in ready()
    codec: CodecSpec | None = None  # how token_arrays are encoded
    remote_retries: int = 0  # remote read retries in the process that made this batch since its last one (issue 21)

    def to(self, device: torch.device) -> "Batch":
        moved = {f: getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__
                 if isinstance(getattr(self, f), torch.Tensor)}
        if self.token_arrays is not None:
            moved["token_arrays"] = {k: v.to(device, non_blocking=True) for k, v in self.token_arrays.items()}
        return replace(self, **moved)

    def ready(self) -> "Batch":
        """``images`` and ``tokens`` made on the batch's device (``visible``'s)."""
        if self.pending is None and self.token_arrays is None:
            return self
        device = self.visible.device
        images = self.pending.render(device) if self.pending is not None else self.images
        tokens = decode_token_tensors(self.token_arrays, self.codec) if self.token_arrays is not None else self.tokens
        return replace(self, images=images, tokens=tokens, pending=None, token_arrays=None)


def whole_batch(batch: Batch) -> Batch:
    """DataLoader ``collate_fn``: these datasets already return whole batches."""
    return batch


class EpochRows(list):
    """A batch's rows (a plain list to every caller) that also carries the epoch it was drawn
    for, so a dataset in any DataLoader worker can draw that epoch's fresh student masks."""

    def __init__(self, rows: list[int], epoch: int) -> None:
        super().__init__(rows)
        self.epoch = epoch


def batch_epoch(rows: list[int]) -> int:
    return int(getattr(rows, "epoch", 0))


def check_student_mask(mode: str, view_cfg: ViewConfig, targets: str, fix: str) -> None:
    """``--student-mask fresh`` only where the targets do not depend on the mask (issue 12)."""
    if mode == "fresh" and view_cfg.teacher_view != "full":
        raise HgkdError(f"--student-mask fresh: {targets} depend on the mask the teacher saw; {fix} "
                        f"(or keep --student-mask cached)")


def fresh_masks(view_cfg: ViewConfig, seed: int, keys: list[str], epoch: int) -> np.ndarray:
    """(B, grid, grid) bool student masks of ``epoch`` (True = hidden), one per key."""
    return np.stack([draw_student_mask(view_cfg, seed, str(key), epoch) for key in keys])


class CacheViewDataset(Dataset):
    """Index with a list of cache rows; returns one :class:`Batch`.

    ``views``: use views 0..K-1 of each image (0: all the cache holds). ``view_rows`` is the
    (images, K) table of their cache rows, built from the cache's own ``index`` and
    ``view_index`` arrays (a grown cache appends rows, so row != image * K + view).
    ``student_mask="fresh"``: the student's mask of a row read in epoch e is drawn from
    ``(mask_seed, key, e)`` (full-view caches only); ``"cached"``: the stored view mask.
    """

    def __init__(self, cache_url: str, data: list[str], views: int = 0, student_mask: str = "cached",
                 mask_seed: int = 0, decoder: str | None = None) -> None:
        self.cache_url = cache_url
        cache = FeatureCache.open(cache_url)
        if not cache.is_complete():
            raise HgkdError(f"--cache {cache_url} is incomplete; finish it with 'hgkd-extract run' and check 'verify'")
        source = open_indexed(data)  # counted by the sample index
        if not same_data(source, cache.meta.dataset):
            raise HgkdError(f"--data {' '.join(data)} is not the data set the cache was made from "
                            f"(fingerprint differs); pass the same shards/folder as to 'hgkd-extract run'")
        self.view_cfg = ViewConfig.from_json(cache.meta.view)
        self.decoder = decoder or self.view_cfg.decoder  # default: the one that made the teacher's pixels
        check_student_mask(student_mask, self.view_cfg, f"the masked-view targets of --cache {cache_url}",
                           "use a cache written with --teacher-view full")
        self.student_mask, self.mask_seed = student_mask, mask_seed
        self.grid = tuple(cache.meta.teacher["grid"])
        self.source = RandomAccessSource(source)
        self._cache: FeatureCache | None = None
        self._reader: ShardReader | None = None
        self._pid = os.getpid()
        self.view_rows = self._view_table(cache, views)
        self.ok_rows = np.sort(self.view_rows.ravel())

    def _view_table(self, cache: FeatureCache, views: int) -> np.ndarray:
        """(images, K) cache rows of views 0..K-1 of every image whose K views are all OK."""
        held = int(cache.meta.view["views_per_image"])
        if views > held:
            raise HgkdError(f"--cache-views {views}: {self.cache_url} holds {held} views per image; grow it with "
                            f"'hgkd-extract run ... --views-per-image {views}' or use fewer")
        k_views = views or held
        raw = self.reader.read(np.arange(cache.num_views), ["status", "index", "view_index"])
        rows = np.flatnonzero((raw["status"] == STATUS_OK) & (raw["view_index"] < k_views))
        index, view = raw["index"][rows], raw["view_index"][rows]
        table = np.full((int(index.max()) + 1 if len(rows) else 0, k_views), -1, np.int64)
        table[index, view] = rows
        return table[(table >= 0).all(1)]

    @property
    def views(self) -> int:
        return self.view_rows.shape[1]

    @property
    def num_samples(self) -> int:
        return len(self.view_rows)

    @property
    def cache(self) -> FeatureCache:
        if self._pid != os.getpid():  # a forked worker: a remote store's client is the parent's
            self._cache, self._reader, self._pid = None, None, os.getpid()
        if self._cache is None:  # opened lazily: once per DataLoader worker
            self._cache = FeatureCache.open(self.cache_url)
        return self._cache

    @property
    def reader(self) -> ShardReader:
        """Direct shard reader (cached shard indexes, Zarr's codecs): thousands of views/s."""
        cache = self.cache  # first: it resets both after a fork
        if self._reader is None:
            self._reader = ShardReader(cache, threads=1)
        return self._reader

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "_reader": None}

    def __len__(self) -> int:
        return len(self.ok_rows)

    def __getitem__(self, rows: list[int]) -> Batch:
        """The rows' batch; ``rows`` may be :class:`EpochRows` (fresh student masks need the epoch).
        Tokens stay encoded, and a device decoder's pixels are not made here: call ``ready()``."""
        rows_sorted = np.sort(np.asarray(rows, dtype=np.int64))
        cache = self.cache
        names = ["tokens", *cache.codec.aux_arrays(1, 1), "valid", "pooled", "mask", "crop", "flip", "index", "key"]
        raw = self.reader.read(rows_sorted, names)
        blobs = self.source.read_many([int(x) for x in raw["index"]])
        for i, (index, data) in enumerate(zip(raw["index"], blobs)):
            if data is None or self.source.keys[index] != raw["key"][i]:
                raise HgkdError(f"--data sample {index} is not cache row {rows_sorted[i]}'s image; data and cache disagree")
        cfg, crop_b4, flip_b = self.view_cfg, raw["crop"], raw["flip"]
        if self.decoder in DEVICE_DECODERS:
            images, pending = None, PendingViews(list(blobs), list(range(len(blobs))), torch.from_numpy(crop_b4),
                                                 torch.from_numpy(flip_b), cfg.img_size, cfg.interpolation)
        else:
            pending = None
            images = torch.stack([render_crop(self.source.decode_cached(int(raw["index"][i]), data),
                                              tuple(int(v) for v in crop_b4[i]), bool(flip_b[i]),
                                              cfg.img_size, cfg.interpolation) for i, data in enumerate(blobs)])
        mask = raw["mask"].reshape(-1, *self.grid)
        if self.student_mask == "fresh":
            mask = fresh_masks(self.view_cfg, self.mask_seed, list(raw["key"]), batch_epoch(rows))
        return Batch(
            rows=torch.from_numpy(rows_sorted),
            images=images,
            visible=torch.from_numpy(~mask),
            valid=torch.from_numpy(raw["valid"]),
            pooled=torch.from_numpy(raw["pooled"].astype(np.float32)),
            pending=pending,
            token_arrays=token_tensors(raw, cache.codec),
            codec=cache.codec,
            remote_retries=take_retries(),
        )


class OnlineViewDataset(Dataset):
    """Views drawn like the extractor draws them, without a cache (``--online-teacher``).

    Row r is view ``r % K`` of sample ``r // K`` (K = ``view_cfg.views_per_image``; the
    extractor's row of that view in a K-view cache); undecodable samples are dropped from
    their batch. Targets are filled in by the trainer's live teacher. ``labelled``: every
    sample must carry a class label (a ``.cls`` member or a class sub-folder).
    ``student_mask="fresh"``: the student's mask is drawn per epoch as in :class:`CacheViewDataset`.
    """

    def __init__(self, data: list[str], view_cfg: ViewConfig, labelled: bool = False, student_mask: str = "cached",
                 mask_seed: int = 0) -> None:
        self.view_cfg = view_cfg
        check_student_mask(student_mask, view_cfg, "a masked online teacher's targets", "use --teacher-view full")
        self.student_mask, self.mask_seed = student_mask, mask_seed
        self.source = open_random_access(data)
        self.labels = np.asarray(self.source.labels, dtype=np.int64)
        unlabelled = int((self.labels < 0).sum())
        if labelled and unlabelled:
            raise HgkdError(f"--data {' '.join(data)}: {unlabelled} of {len(self.labels)} samples have no class "
                            f"label (a .cls member or a class sub-folder); supervised methods need labels")

    @property
    def num_samples(self) -> int:
        return len(self.source.keys)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        return self.num_samples * self.view_cfg.views_per_image

    def __getitem__(self, rows: list[int]) -> Batch:
        k_views = self.view_cfg.views_per_image
        kept, images, masks = [], [], []
        for row in sorted(rows):
            index, k = divmod(int(row), k_views)
            data = self.source.read(index)
            try:
                image = decode_image(data) if data is not None else None
            except Exception:
                image = None
            if image is None:
                continue
            params = sample_view(self.view_cfg, self.source.keys[index], k, (image.shape[1], image.shape[2]))
            kept.append(row)
            images.append(render_view(image, params, self.view_cfg))
            masks.append(params.mask_hw)
        if not kept:
            raise HgkdError("--data: a whole batch of images could not be decoded")
        samples = torch.tensor(kept) // k_views
        if self.student_mask == "fresh":
            masks = fresh_masks(self.view_cfg, self.mask_seed, [self.source.keys[s] for s in samples], batch_epoch(rows))
        return Batch(rows=torch.tensor(kept), images=torch.stack(images), visible=torch.from_numpy(~np.stack(masks)),
                     labels=torch.from_numpy(self.labels[samples.numpy()]), indices=samples,
                     remote_retries=take_retries())


class ChunkAwareBatchSampler(Sampler[list[int]]):
    """One pass over the images per epoch, each read from its view of the epoch, in batches
    that each touch few cache shards (issue 12: an epoch is an image pass).

    ``rows``: (images, K) cache rows of every image's K views (1-D: one view each); epoch e
    reads column ``e mod K``. Images are grouped by the cache shard of the row they read this
    epoch; shards are shuffled, then taken ``window`` at a time; images are shuffled within a
    window and cut into batches, all seeded by (seed, epoch). Under DDP rank r takes batches
    r, r+world, ...; batches are full (drop_last) so every rank steps the same number of
    times. ``start_batch`` skips the batches an interrupted epoch already trained on (resume).
    Yields :class:`EpochRows`.
    """

    def __init__(self, rows: np.ndarray, shard_views: int, batch_size: int, seed: int = 0,
                 window: int = 4, rank: int = 0, world_size: int = 1) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.rows_nk = rows.reshape(len(rows), -1)
        self.shard_views, self.batch_size = shard_views, batch_size
        self.seed, self.window, self.rank, self.world_size = seed, window, rank, world_size
        self.epoch, self.start_batch = 0, 0
        self._memo: tuple[int, list[np.ndarray]] | None = None
        if len(self) == 0:
            raise HgkdError(f"--batch-size {batch_size} is larger than the {len(self.rows_nk)} usable images "
                            f"per rank; lower it")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """(images,) the row each image reads in ``epoch``: its view ``epoch mod K``."""
        return self.rows_nk[:, epoch % self.rows_nk.shape[1]]

    def _all_batches(self) -> list[np.ndarray]:
        """Every rank's batches of this epoch (memoised: the cost ledger asks per step)."""
        if self._memo is not None and self._memo[0] == self.epoch:
            return self._memo[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        rows = self.epoch_rows(self.epoch)
        shards, shard_of_row = np.unique(rows // self.shard_views, return_inverse=True)
        order = rng.permutation(len(shards))
        window_of_shard = np.empty(len(shards), np.int64)
        window_of_shard[order] = np.arange(len(shards)) // self.window
        by_window = np.argsort(window_of_shard[shard_of_row], kind="stable")  # rows keep their order
        bounds = np.cumsum(np.bincount(window_of_shard[shard_of_row]))[:-1]
        flat = np.concatenate([rng.permutation(part) for part in np.split(rows[by_window], bounds)])
        n_batches = len(flat) // (self.batch_size * self.world_size) * self.world_size
        batches = [flat[b * self.batch_size : (b + 1) * self.batch_size] for b in range(n_batches)]
        self._memo = (self.epoch, batches)
        return batches

    def global_batch(self, index: int) -> np.ndarray:
        """Rows read by every rank's ``index``-th batch of this epoch (one optimizer step)."""
        return np.concatenate(self._all_batches()[index * self.world_size : (index + 1) * self.world_size])

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._all_batches()[self.rank :: self.world_size]
        for batch in mine[self.start_batch :]:
            yield EpochRows(batch.tolist(), self.epoch)

    def __len__(self) -> int:
        return len(self.rows_nk) // (self.batch_size * self.world_size)


class ViewCycleSampler(ChunkAwareBatchSampler):
    """Batches of samples for training on views drawn on the fly: in epoch e, sample s is
    fed as view ``e % K`` (row ``s * K + e % K`` of :class:`OnlineViewDataset`), so every epoch
    sees fresh crops and a resumed run sees exactly the same ones.

    Samples are grouped in blocks of ``samples_per_block`` as a K-view cache with
    ``samples_per_block * K`` views per shard groups them, so with the same seed the batches
    equal that cache's under :class:`ChunkAwareBatchSampler` (issue 12, ``--online-views``).
    """

    def __init__(self, num_samples: int, views_per_image: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, samples_per_block: int = 256) -> None:
        self.views_per_image = views_per_image
        super().__init__(np.arange(num_samples), samples_per_block * views_per_image, batch_size, seed,
                         rank=rank, world_size=world_size)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        return self.rows_nk[:, 0] * self.views_per_image + epoch % self.views_per_image


class TwinCacheSampler(Sampler[list[int]]):
    """An online run's batches taken from a cache's (``--online-teacher`` with ``--cache``, issue 22):
    the images a cached run on that cache reads, grouped and ordered exactly as
    :class:`ChunkAwareBatchSampler` groups its rows (its shard size, its skipped images left
    out), each shown as the online row of the epoch's view: with ``views`` K (``--online-views``)
    view ``e mod K``, the very view the cached run reads; with 0, the fresh view ``e``."""

    def __init__(self, cached: ChunkAwareBatchSampler, index_of_row: np.ndarray, row_views: int, views: int) -> None:
        self.cached, self.index_of_row, self.row_views, self.views = cached, index_of_row, row_views, views

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.cached.set_epoch(epoch, start_batch)

    def online_rows(self, cache_rows: np.ndarray, epoch: int) -> np.ndarray:
        view = epoch % self.views if self.views else epoch
        return self.index_of_row[np.asarray(cache_rows, np.int64)] * self.row_views + view

    def global_batch(self, index: int) -> np.ndarray:
        return self.online_rows(self.cached.global_batch(index), self.cached.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.cached:
            yield EpochRows(self.online_rows(np.asarray(batch), batch.epoch).tolist(), batch.epoch)

    def __len__(self) -> int:
        return len(self.cached)
