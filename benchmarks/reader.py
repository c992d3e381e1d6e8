"""P2b: the cache reader alone - random batches of 64 views/s, zarr-python vs ``ShardReader``.

Run: ``.venv/bin/python benchmarks/reader.py [--views 4096] [--quick]``.
Builds caches of ViT-L-sized synthetic tokens (196x1024: low rank + noise + a few outlier
channels, encoded with ``storage.codecs.encode_tokens``) through ``FeatureCache.create`` +
``write_shard`` - no teacher runs - for the default codec (int8ct/lz4) and bf16/lz4. Arms,
measured as medians of interleaved repeats on the same random batches:
- ``zarr``: ``FeatureCache.read`` (zarr-python's ``get_orthogonal_selection``);
- ``reader-1t`` / ``reader-2t``: ``ShardReader`` with 1 or 2 decode threads, warm (indexes and
  small-array chunks kept from earlier batches);
- ``reader-2t-lru0``: no decoded small-array chunks kept, as when a cache has far more
  shards than the LRU holds and batches are fully random (ImageNet-sized caches);
- ``*-reopen``: a new reader per repeat (index and chunk caches dropped, page cache warm);
- ``*-cold``: as reopen, and the cache's files dropped from the OS page cache first
  (``posix_fadvise(DONTNEED)``), so bytes come from the disk;
- ``loader-Nw-Mt``: a DataLoader with N worker processes, each reading through its own
  (pickled) ``ShardReader`` with M decode threads, batches handed to the main process.
"targets" reads what training needs per view (``tokens`` + the codec's scale arrays, what
``read_tokens`` decodes); "all" reads every array ``distill.data.CacheViewDataset`` reads.
Scaling with loader workers (no goal, just the ratio): ``loader-1w-1t`` vs ``loader-2w-1t``
(the cache read alone), and stage two's own loader - ``distill.data.CacheViewDataset`` in a
DataLoader with 1 vs 2 workers - on a third int8ct cache whose rows are real 224-px views of
ImageNet-like JPEGs (``--photos`` synthetic photo-like images of about 500x375, quality 90, in
webdataset tars; ``write_photo_shards``), so each batch also reads and decodes the source
images and re-renders the teacher's views, as in training.
P2c (issue 13): that loader's views/s with one worker, against the bare work in the same run -
``bare-1t``: read the same files' bytes, PIL decode and resize the same crop boxes to 224 px
(bicubic), one thread - and ``inproc-1t``: the dataset called in this process, one thread
(the loader's ceiling without worker hand-over). Goals: >= 500 views/s per worker, and within
1.5x of bare decode + resize.
Remote (issue 15, ``remote_loopback``; reported, no goal): the same random batches read over
HTTP on loopback from a Range-capable server in a child process (``tests/range_http.py``):
``ShardReader`` on the int8ct cache at an ``http://`` URL (ranged reads of shard files, one
``cat_ranges`` per array and batch) against the local reader in the same run;
``RandomAccessSource.read_many`` (what ``CacheViewDataset`` calls per batch) of random
photo-tar members over HTTP against local ``os.pread``; one large ranged read (MB/s).
``--remote-only`` measures just this and merges it into an existing results file.
Writes ``benchmarks/results/reader.json`` with machine info, a ``goals`` and a ``scaling`` object.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import webdataset as wds
import zarr
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from zarr.core.sync import sync

from hgkd.distill.data import CacheViewDataset
from hgkd.data.random_access import open_random_access
from hgkd.data.sources import open_source
from hgkd.data.views import ViewConfig, decode_image, sample_view
from hgkd.storage.cache import STATUS_OK, FeatureCache
from hgkd.storage.codecs import CodecSpec, encode_tokens
from hgkd.storage.metadata import CacheMeta
from hgkd.storage.reader import ShardReader

GOAL = 4000
P2C_GOAL_VIEWS, P2C_STRETCH_VIEWS, P2C_GOAL_VS_BARE = 300, 500, 1.0  # issue 20: 2x issue 13's 147, >= bare
LOADER_NAMES = ["valid", "pooled", "mask", "crop", "flip", "index", "key"]  # besides the token arrays


def synthetic_tokens(n: int, n_tok: int, dim: int, seed: int, rank: int = 48) -> torch.Tensor:
    """ViT-like tokens: a shared low-rank basis, spatially smooth coefficients, noise, outliers."""
    basis = torch.randn(rank, dim, generator=torch.Generator().manual_seed(1234)) / rank**0.5
    g = torch.Generator().manual_seed(seed)
    side = int(round(n_tok**0.5))
    coeff = torch.randn(n, rank, side, side, generator=g)
    coeff = torch.nn.functional.avg_pool2d(coeff, 3, stride=1, padding=1, count_include_pad=False)
    x = coeff.flatten(2).transpose(1, 2) @ basis * 2.0 + 0.25 * torch.randn(n, n_tok, dim, generator=g)
    x[..., :3] = x[..., :3] * 40 + 20  # a few huge channels, as pretrained ViTs have
    return x


@dataclass
class Layout:
    """What a cache's rows are views of: metadata sections and each row's view fields."""

    view: dict
    dataset: dict
    num_views: int
    rows: Callable[[range], dict[str, np.ndarray]]  # key, index, crop, mask, ... of a span of rows
    data: list[str] | None = None  # the --data the rows are views of (None: synthetic keys only)


def synthetic_layout(views: int, n_tok: int) -> Layout:
    """Random view fields and keys without source images (the reader arms need none)."""
    rng = np.random.default_rng(0)

    def rows(span: range) -> dict[str, np.ndarray]:
        n = len(span)
        mask = rng.random((n, n_tok)) < 0.6
        return dict(mask=mask, key=np.array([f"img/{i:08d}" for i in span], dtype=object),
                    index=np.arange(span.start, span.stop), view_index=np.zeros(n, np.int32),
                    src_hw=np.full((n, 2), 480, np.int32), crop=rng.integers(0, 300, (n, 4)).astype(np.int32),
                    flip=rng.random(n) < 0.5, label=rng.integers(0, 1000, n).astype(np.int32))

    return Layout({"views_per_image": 1}, {"kind": "synthetic"}, views, rows)


def write_photo_shards(out_dir: Path, n_images: int, seed: int = 0, per_shard: int = 128) -> str:
    """ImageNet-like JPEGs as webdataset tars: about 500x375 (some portrait or 500x333), quality
    90, photo-like content (smooth colour fields, mid-frequency texture, edges, sensor noise),
    ~85 KB each (ImageNet's training JPEGs average ~110 KB). Returns the brace pattern."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = -(-n_images // per_shard)
    for shard in range(shards):
        with wds.TarWriter(str(out_dir / f"photos-{shard:04d}.tar")) as sink:
            for i in range(shard * per_shard, min(n_images, (shard + 1) * per_shard)):
                w, h = [(500, 375), (375, 500), (500, 333)][int(rng.integers(0, 3))]
                sink.write({"__key__": f"photo/{i:07d}", "jpg": _photo_jpeg(rng, w, h), "cls": str(i % 1000)})
    return str(out_dir / f"photos-{{0000..{shards - 1:04d}}}.tar")


def _photo_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    def field(cells: tuple[int, int], scale: float) -> np.ndarray:
        small = Image.fromarray(rng.integers(0, 256, (*cells, 3), dtype=np.uint8))
        return np.asarray(small.resize((width, height), Image.BICUBIC), np.float32) * scale

    pixels = field((4, 5), 0.7) + field((24, 32), 0.3) + field((96, 128), 0.15) - 40
    for _ in range(int(rng.integers(3, 8))):  # objects: flat-shaded boxes with hard edges
        top, left = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
        pixels[top : top + int(rng.integers(20, height // 2)), left : left + int(rng.integers(20, width // 2))] += \
            rng.normal(0, 50, 3)
    pixels += rng.normal(0, 14, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_layout(views: int, n_photos: int, data_dir: Path) -> Layout:
    """Rows that are real views (``sample_view``, 224 px) of ``n_photos`` ImageNet-like photos, K each."""
    pattern = write_photo_shards(data_dir, n_photos)
    source = open_source([pattern])
    samples = list(source)
    k_views = -(-views // len(samples))
    view_cfg = ViewConfig(views_per_image=k_views)
    src_hw = [tuple(decode_image(s.data).shape[1:]) for s in samples]

    def rows(span: range) -> dict[str, np.ndarray]:
        index = np.arange(span.start, span.stop) // k_views
        params = [sample_view(view_cfg, samples[r // k_views].key, r % k_views, src_hw[r // k_views]) for r in span]
        return dict(mask=np.stack([p.mask_hw.reshape(-1) for p in params]),
                    key=np.array([samples[i].key for i in index], dtype=object), index=index,
                    view_index=(np.arange(span.start, span.stop) % k_views).astype(np.int32),
                    src_hw=np.array([src_hw[i] for i in index], np.int32),
                    crop=np.array([p.crop_tlhw for p in params], np.int32), flip=np.array([p.flip for p in params]),
                    label=np.array([samples[i].label for i in index], np.int32))

    return Layout(view_cfg.to_json(), source.describe(), len(samples) * k_views, rows, [pattern])


def build_cache(url: str, codec: str, layout: Layout, shard_views: int, n_tok: int, dim: int) -> FeatureCache:
    storage = dict(codec=codec, compressor="lz4", clevel=5, shard_views=shard_views, num_views=layout.num_views,
                   num_tokens=n_tok, dim=dim)
    side = int(round(n_tok**0.5))
    teacher = {"name": "synthetic-vit-l", "embed_dim": dim, "patch_size": 16, "grid": [side, side]}
    meta = CacheMeta(teacher=teacher, view=layout.view, dataset=layout.dataset, storage=storage)
    cache = FeatureCache.create(url, meta)
    spec = CodecSpec(codec, "lz4", 5)
    for shard in range(cache.num_shards):
        span = cache.shard_rows(shard)
        n = len(span)
        tokens = synthetic_tokens(n, n_tok, dim, seed=shard)
        rows = encode_tokens(tokens, spec)
        pooled = torch.nn.functional.normalize(tokens.mean(1), dim=1)
        fields = layout.rows(span)
        rows.update(fields, pooled=pooled.half().numpy(), valid=~fields["mask"],
                    status=np.full(n, STATUS_OK, np.uint8))
        cache.write_shard(shard, rows, {"num_ok": n, "num_skipped": 0, "settings": meta.fingerprint()})
    cache.finalize()
    return cache


def drop_page_cache(root: str) -> None:
    """Evict the cache's files from the OS page cache (clean pages; no root needed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def zarr_rows(cache: FeatureCache, names: list[str]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """zarr-python at its best here: one concurrent single-row getitem per row, gathered in one call."""
    arrays = {name: cache.group[name]._async_array for name in names}

    async def gather(rows: np.ndarray) -> list[list]:
        return await asyncio.gather(*(asyncio.gather(*(a.getitem(slice(r, r + 1)) for r in rows.tolist()))
                                      for a in arrays.values()))

    def read(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in zip(arrays, sync(gather(rows)))}

    return read


def views_per_s(read: Callable[[np.ndarray], object], batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for rows in batches:
        read(rows)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


class _ReaderDataset(Dataset):
    """A DataLoader dataset: ``ds[rows]`` is one batch read through a (pickled) ShardReader."""

    def __init__(self, reader: ShardReader, names: list[str]) -> None:
        self.reader, self.names = reader, names

    def __len__(self) -> int:
        return self.reader.cache.num_views

    def __getitem__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self.reader.read(rows, self.names)


def _as_is(batch: object) -> object:
    return batch  # datasets here return whole batches, as stage two's does


def _views_in(batch: object) -> int:
    return len(batch["tokens"]) if isinstance(batch, dict) else len(batch.rows)


def dataset_views_per_s(ds: Dataset, batches: list, workers: int) -> float:
    """Worker processes read and hand over batches; timed after every worker delivered one."""
    loader = DataLoader(ds, batch_size=None, sampler=batches, num_workers=workers, prefetch_factor=4,
                        collate_fn=_as_is)
    it = iter(loader)
    for _ in range(workers):  # start-up (fork, first open) is not the reader's speed
        next(it)
    start = time.perf_counter()
    n = sum(_views_in(batch) for batch in it)
    return n / (time.perf_counter() - start)


def loader_views_per_s(cache: FeatureCache, names: list[str], batches: list[np.ndarray], workers: int,
                       threads: int) -> float:
    return dataset_views_per_s(_ReaderDataset(ShardReader(cache, names, threads=threads), names), batches, workers)


def measure_codec(cache: FeatureCache, batches: list[np.ndarray], repeats: int) -> dict:
    targets = ["tokens", *cache.codec.aux_arrays(1, 1)]
    every = targets + LOADER_NAMES
    root = cache.local_dir
    # zarr-python arms run at tens to hundreds of views/s here: they get fewer of the same batches.
    few, some = batches[: max(1, len(batches) // 16)], batches[: max(1, len(batches) // 4)]
    warm = {t: ShardReader(cache, targets, threads=t) for t in (1, 2)}
    for reader in warm.values():  # first touch of every shard: indexes, small chunks, pages
        reader.read(np.arange(cache.num_views), every)

    lru0 = ShardReader(cache, targets, threads=2, lru_shards=0)  # small-array chunks decoded every batch

    def fresh(threads: int, cold: bool, names: list[str]) -> Callable[[np.ndarray], object]:
        if cold:
            drop_page_cache(root)
        return ShardReader(cache, names, threads=threads).read

    def cold_zarr_rows(rows_batches: list[np.ndarray]) -> float:
        drop_page_cache(root)
        return views_per_s(zarr_rows(cache, targets), rows_batches)

    arms: dict[str, Callable[[], float]] = {
        "targets/zarr": lambda: views_per_s(lambda r: cache.read(r, targets), few),
        "targets/zarr-rows": lambda: views_per_s(zarr_rows(cache, targets), some),
        "targets/reader-1t": lambda: views_per_s(warm[1].read, batches),
        "targets/reader-2t": lambda: views_per_s(warm[2].read, batches),
        "targets/reader-2t-lru0": lambda: views_per_s(lru0.read, batches),
        "targets/reader-1t-reopen": lambda: views_per_s(fresh(1, False, targets), batches),
        "targets/reader-2t-reopen": lambda: views_per_s(fresh(2, False, targets), batches),
        "targets/zarr-rows-cold": lambda: cold_zarr_rows(some),
        "targets/reader-2t-cold": lambda: views_per_s(fresh(2, True, targets), batches),
        "all/zarr": lambda: views_per_s(lambda r: cache.read(r, every), few),
        "all/zarr-rows": lambda: views_per_s(zarr_rows(cache, every), few),
        "all/reader-2t": lambda: views_per_s(lambda r: warm[2].read(r, every), batches),
        "read_tokens/zarr": lambda: views_per_s(cache.read_tokens, few),
        "read_tokens/reader-2t": lambda: views_per_s(warm[2].read_tokens, some),
        "targets/loader-1w-1t": lambda: loader_views_per_s(cache, targets, batches, 1, 1),
        "targets/loader-1w-2t": lambda: loader_views_per_s(cache, targets, batches, 1, 2),
        "targets/loader-2w-1t": lambda: loader_views_per_s(cache, targets, batches, 2, 1),
    }
    runs: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved: every arm once per repeat
        for name, arm in arms.items():
            runs[name].append(arm())
    return {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()}


def measure_remote(tmp: Path, cache: FeatureCache, batches: list[np.ndarray], photos: str, repeats: int) -> dict:
    """Loopback HTTP against local files, same batches, interleaved repeats (views/s, MB/s)."""
    import sys
    import fsspec

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from range_http import serve_in_process as serve

    targets = ["tokens", *cache.codec.aux_arrays(1, 1)]
    root = Path(cache.local_dir).parent  # served: the cache and ``photos/`` (both runs write them there)
    assert Path(photos).parent == root / "photos"
    view_bytes = sum(cache.group[n].nbytes_stored() for n in targets) / cache.num_views
    local_data = open_random_access(photos, None)
    rng = np.random.default_rng(2)
    samples = [rng.choice(len(local_data.keys), 64, replace=False) for _ in range(8)]
    sample_bytes = float(np.mean([len(local_data.read(int(i))) for b in samples for i in b]))
    big = sorted(Path(photos).parent.glob("*.tar"))[0]
    with serve(str(root)) as url:
        remote_cache = FeatureCache.open(f"{url}/{Path(cache.local_dir).name}")
        readers = {"local": ShardReader(cache, targets, threads=2), "http": ShardReader(remote_cache, targets, threads=2)}
        for reader in readers.values():  # warm: shard indexes and small chunks kept, as in training
            reader.read(np.arange(cache.num_views), targets)
        remote_data = open_random_access(f"{url}/photos/{Path(photos).name}", None)
        data = {"local": local_data, "http": remote_data}
        fs = fsspec.filesystem("http")
        arms: dict[str, Callable[[], float]] = {
            **{f"cache/{k}": (lambda r=r: views_per_s(r.read, batches)) for k, r in readers.items()},
            **{f"data/{k}": (lambda d=d: views_per_s(lambda b: d.read_many(b.tolist()), samples))
               for k, d in data.items()},
            "http/one-range-MBps": lambda: big.stat().st_size / 1e6 / timed_s(
                lambda: fs.cat_file(f"{url}/photos/{big.name}", start=0, end=big.stat().st_size)),
        }
        runs: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(repeats):
            for name, arm in arms.items():
                runs[name].append(arm())
    med = {name: statistics.median(v) for name, v in runs.items()}
    out = {"server": "tests/range_http.py (ThreadingHTTPServer, Range, keep-alive) on 127.0.0.1",
           "cache_view_bytes": view_bytes, "data_sample_bytes": sample_bytes,
           "cache_views_per_s": {k: med[f"cache/{k}"] for k in readers},
           "cache_MBps": {k: med[f"cache/{k}"] * view_bytes / 1e6 for k in readers},
           "cache_http_vs_local": med["cache/http"] / med["cache/local"],
           "data_samples_per_s": {k: med[f"data/{k}"] for k in data},
           "data_MBps": {k: med[f"data/{k}"] * sample_bytes / 1e6 for k in data},
           "data_http_vs_local": med["data/http"] / med["data/local"],
           "one_range_read_MBps": med["http/one-range-MBps"], "one_range_read_bytes": big.stat().st_size,
           "runs": runs}
    print(f"\nloopback HTTP: cache {out['cache_views_per_s']['http']:,.0f} views/s ({out['cache_MBps']['http']:.0f} MB/s, "
          f"{out['cache_http_vs_local']:.2f}x local), data {out['data_samples_per_s']['http']:,.0f} samples/s "
          f"({out['data_MBps']['http']:.1f} MB/s, {out['data_http_vs_local']:.2f}x local), one ranged read "
          f"{out['one_range_read_MBps']:.0f} MB/s")
    return out


def timed_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_cacheview(tmp: Path, args: argparse.Namespace, n_tok: int, dim: int) -> dict:
    """Stage two's loader (``CacheViewDataset``) with 1 vs 2 DataLoader workers, in this process
    (one thread), and bare PIL decode + resize of the same files; interleaved repeats."""
    layout = photo_layout(args.photo_views, args.photos, tmp / "photos")
    start = time.perf_counter()
    cache = build_cache(str(tmp / "photos.zarr"), "int8ct", layout, args.shard_views, n_tok, dim)
    built = time.perf_counter() - start
    ds = CacheViewDataset(cache.url, layout.data)
    rng = np.random.default_rng(1)
    batches = [rng.choice(ds.ok_rows, args.batch_size, replace=False).tolist() for _ in range(args.view_batches)]
    crops = ds.reader.read(np.arange(cache.num_views), ["crop", "index"])
    arms: dict[str, Callable[[], float]] = {
        "bare-1t": lambda: one_thread(lambda: bare_decode_views_per_s(ds.source, crops, batches, ds.view_cfg.img_size)),
        "inproc-1t": lambda: one_thread(lambda: views_per_s(ds.__getitem__, batches)),
        "loader-1w": lambda: dataset_views_per_s(ds, batches, 1),
        "loader-2w": lambda: dataset_views_per_s(ds, batches, 2),
    }
    runs: dict[str, list[float]] = {name: [] for name in arms}
    cores: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, arm in arms.items():
            cpu, wall = cpu_seconds(), time.perf_counter()
            runs[name].append(arm())
            cores[name].append((cpu_seconds() - cpu) / (time.perf_counter() - wall))
    jpeg_bytes = [len(ds.source.read(i)) for i in range(ds.num_samples)]
    return {"views": cache.num_views, "source_images": layout.dataset["num_samples"], "build_s": built,
            "jpeg_kb_mean": float(np.mean(jpeg_bytes)) / 1024, "batches_per_measurement": len(batches),
            # CPU seconds of this process and its (joined) workers / wall, start-up included:
            # below the worker count, the cores were busy with other work
            "cpu_cores_used": {name: statistics.median(v) for name, v in cores.items()},
            "arms": {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()}}


def one_thread(fn: Callable[[], float]) -> float:
    """Run ``fn`` with one torch thread, as inside a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def bare_decode_views_per_s(source, crops: dict[str, np.ndarray], batches: list[list[int]], size: int) -> float:
    """The floor of a view: read the image bytes, PIL decode, resize the crop box to ``size``."""
    start, n = time.perf_counter(), 0
    for rows in batches:
        for row in rows:
            top, left, h, w = (int(v) for v in crops["crop"][row])
            with Image.open(io.BytesIO(source.read(int(crops["index"][row])))) as img:
                rgb = img if img.mode == "RGB" else img.convert("RGB")
                np.asarray(rgb.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)))
            n += 1
    return n / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (loader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage,
                                                      (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def scaling_row(measure: str, one: float, two: float) -> dict:
    return {"measure": measure, "1_worker_views_per_s": one, "2_workers_views_per_s": two, "ratio_2_vs_1": two / one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--views", type=int, default=4096)
    ap.add_argument("--shard-views", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=64, help="random batches per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codecs", default="int8ct,bf16")
    ap.add_argument("--view-batches", type=int, default=24, help="random batches per CacheViewDataset measurement")
    ap.add_argument("--photos", type=int, default=512, help="ImageNet-like JPEGs behind the CacheViewDataset cache")
    ap.add_argument("--photo-views", type=int, default=1024, help="views of those photos in that cache")
    ap.add_argument("--quick", action="store_true", help="small cache, 1 repeat: checks the script, not the goal")
    ap.add_argument("--out", help="JSON to write (default benchmarks/results/reader.json; --quick writes only to --out)")
    ap.add_argument("--skip-codecs", action="store_true", help="only the CacheViewDataset part (P2c and its scaling)")
    ap.add_argument("--remote-only", action="store_true",
                    help="only the loopback HTTP part, merged into the existing results file")
    args = ap.parse_args()
    if args.quick:
        args.views, args.shard_views, args.batches, args.repeats, args.view_batches = 512, 128, 8, 1, 6
        args.photos, args.photo_views = 64, 128
    n_tok, dim = 196, 1024
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(args.views, args.batch_size, replace=False)) for _ in range(args.batches)]
    batches = [rng.permutation(b) for b in batches]  # unsorted, as a shuffling sampler gives them
    results, load_before = {}, os.getloadavg()
    if args.remote_only:
        return remote_only(args, batches, n_tok, dim)
    with tempfile.TemporaryDirectory() as tmp:
        for codec in [] if args.skip_codecs else args.codecs.split(","):
            start = time.perf_counter()
            layout = synthetic_layout(args.views, n_tok)
            cache = build_cache(str(Path(tmp) / f"{codec}.zarr"), codec, layout, args.shard_views, n_tok, dim)
            built = time.perf_counter() - start
            arms = measure_codec(cache, batches, args.repeats)
            results[codec] = {"bytes_per_view": cache.group["tokens"].nbytes_stored() / args.views,
                              "build_s": built, "arms": arms}
            print_table(codec, arms)
        cacheview = measure_cacheview(Path(tmp), args, n_tok, dim)
        remote = None
        if "int8ct.zarr" in {Path(c).name for c in os.listdir(tmp)}:
            remote = measure_remote(Path(tmp), FeatureCache.open(str(Path(tmp) / "int8ct.zarr")), batches,
                                    str(Path(tmp) / "photos" / "photos-{0000..0000}.tar"), args.repeats)
    view_arms = cacheview["arms"]
    scaling = {
        "cacheview_loader_workers": {**scaling_row(
            "distill.data.CacheViewDataset in a DataLoader (cache rows + source image decode + view render), "
            "int8ct/lz4, random batches of 64", view_arms["loader-1w"]["median"], view_arms["loader-2w"]["median"]),
            **{k: v for k, v in cacheview.items() if k != "arms"}, "runs": {k: v["runs"] for k, v in view_arms.items()}},
    }
    goals = p2c_goals(cacheview)
    if results:
        main_codec = "int8ct" if "int8ct" in results else next(iter(results))
        read_arms = results[main_codec]["arms"]
        scaling["cache_reader_loader_workers"] = scaling_row(
            f"ShardReader (1 decode thread per worker) in a DataLoader, tokens + scale arrays of {main_codec}/lz4, "
            "random batches of 64", read_arms["targets/loader-1w-1t"]["median"],
            read_arms["targets/loader-2w-1t"]["median"])
        value = read_arms["targets/reader-2t"]["median"]
        others = {f"{codec}/{arm}": row["arms"][f"targets/{arm}"]["median"] for codec, row in results.items()
                  for arm in ("reader-2t", "reader-2t-cold", "loader-2w-1t")}
        goals = {"P2b_reader_random_batches_64": {
            "value": value, "goal": GOAL, "met": value >= GOAL,
            "measure": f"ShardReader, 2 threads, warm, tokens + scale arrays of {main_codec}/lz4, random batches of 64",
            "other_arms": others}, **goals}
        print(f"P2b goal: {value:,.0f} views/s (goal >= {GOAL:,})")
    print_scaling(scaling)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "zarr": zarr.__version__, "numpy": np.__version__,
                    # other processes' load: the 2 cores are shared, so compare ratios, not absolutes
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "views": args.views, "shard_views": args.shard_views, "batch_size": args.batch_size,
        "batches_per_measurement": args.batches, "repeats": args.repeats, "tokens": [n_tok, dim],
        "codecs": results, "scaling": scaling, "goals": goals, "remote_loopback": remote,
    }
    for name, row in p2c_goals(cacheview).items():
        print(f"{name}: {row['value']:,.3f} (goal >= {row['goal']:,.3f}) {'met' if row['met'] else 'NOT met'}")
    out = args.out or (None if args.quick else str(Path(__file__).parent / "results" / "reader.json"))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")


def remote_only(args: argparse.Namespace, batches: list[np.ndarray], n_tok: int, dim: int) -> None:
    """``--remote-only``: the loopback HTTP arms on a fresh int8ct cache and photo tars, merged
    into the results file (the other sections keep their earlier run)."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_cache(str(Path(tmp) / "int8ct.zarr"), "int8ct", synthetic_layout(args.views, n_tok),
                            args.shard_views, n_tok, dim)
        photos = write_photo_shards(Path(tmp) / "photos", min(args.photos, 128))
        remote = measure_remote(Path(tmp), cache, batches, photos, args.repeats)
    remote["measured_with"] = {"views": args.views, "shard_views": args.shard_views, "batch_size": args.batch_size,
                               "batches": len(batches), "repeats": args.repeats, "loadavg_1_5_15_before": load_before,
                               "loadavg_1_5_15_after": os.getloadavg()}
    out = args.out or (None if args.quick else str(Path(__file__).parent / "results" / "reader.json"))
    if out:
        result = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        result["remote_loopback"] = remote
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out} (remote_loopback)")


def p2c_goals(cacheview: dict) -> dict:
    """P2c: CacheViewDataset views/s with one loader worker; and that over bare decode + resize."""
    arms = {name: row["median"] for name, row in cacheview["arms"].items()}
    per_worker, ratio = arms["loader-1w"], arms["loader-1w"] / arms["bare-1t"]
    measure = (f"distill.data.CacheViewDataset, 1 DataLoader worker, 224-px views of ImageNet-like JPEGs "
               f"(~500x375, {cacheview['jpeg_kb_mean']:.0f} KB mean), random batches")
    return {
        "P2c_cacheview_views_per_worker": {"value": per_worker, "goal": P2C_GOAL_VIEWS,
                                           "met": per_worker >= P2C_GOAL_VIEWS, "stretch": P2C_STRETCH_VIEWS,
                                           "stretch_met": per_worker >= P2C_STRETCH_VIEWS, "measure": measure},
        "P2c_cacheview_vs_bare_decode_resize": {
            "value": ratio, "goal": P2C_GOAL_VS_BARE, "met": ratio >= P2C_GOAL_VS_BARE,
            "measure": measure + " / bare PIL decode + bicubic resize of the same crops, 1 thread, same run",
            "other_arms": arms}}


def print_table(codec: str, arms: dict) -> None:
    med = {name: row["median"] for name, row in arms.items()}
    print(f"\n{codec}/lz4: random batches of views, views/s (median of repeats) and ratios on the same arrays")
    print(f"{'arm':<28}{'views/s':>10}{'x FeatureCache.read':>21}{'x zarr-rows':>13}")
    for name, value in med.items():
        set_ = name.split("/")[0]
        ratios = []
        for ref in (f"{set_}/zarr", f"{set_}/zarr-rows" + ("-cold" if name.endswith("-cold") else "")):
            ratios.append(f"{value / med[ref]:.2f}" if ref in med else "-")
        print(f"{name:<28}{value:>10,.0f}{ratios[0]:>21}{ratios[1]:>13}")


def print_scaling(scaling: dict) -> None:
    print("\nscaling with DataLoader workers, random batches of 64, views/s (median of repeats)")
    print(f"{'loader':<32}{'1 worker':>10}{'2 workers':>11}{'ratio':>8}")
    for name, row in scaling.items():
        print(f"{name:<32}{row['1_worker_views_per_s']:>10,.0f}{row['2_workers_views_per_s']:>11,.0f}"
              f"{row['ratio_2_vs_1']:>8.2f}")
        if "cpu_cores_used" in row:
            print(f"{'  CPU cores used':<32}{row['cpu_cores_used']['loader-1w']:>10.2f}"
                  f"{row['cpu_cores_used']['loader-2w']:>11.2f}")


if __name__ == "__main__":
    main()
