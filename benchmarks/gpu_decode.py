"""Batched GPU JPEG decode (nvJPEG through torchvision) against the PIL path stage one and two use
today (issue 20, items 4 and 5).

On ImageNet-like JPEGs (``reader.write_photo_shards``: ~500x375, quality 90) it measures, for the
same stored views (``sample_view``, 224 px):

- ``pil_1core``: PIL decode + ``render_view`` in one thread, as inside one DataLoader worker;
- ``nvjpeg``: ``torchvision.io.decode_jpeg(device=...)`` on a batch of byte tensors, then crop,
  resize (bicubic, antialiased, the view's interpolation) and flip on the device, synchronised;
- the pixel difference of the two paths on the same views (max and mean absolute, in levels):
  what a cache's decoder fingerprint must tolerate or refuse (item 2).

Writes ``--out`` JSON. No goal here: the combine step of ``device_check.sh`` sets nvJPEG views/s
against the ViT-L forward it must feed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reader import write_photo_shards  # noqa: E402

from hgkd.data.sources import open_source  # noqa: E402
from hgkd.data.view_config import ViewConfig  # noqa: E402
from hgkd.data.views import ViewParams, decode_image, render_view, sample_view  # noqa: E402


def render_on_device(images: list[torch.Tensor], params: list[ViewParams], cfg: ViewConfig) -> torch.Tensor:
    """Decoded (3, H, W) uint8 images on the device -> (B, 3, S, S) uint8 views (crop, resize, flip)."""
    mode = InterpolationMode(cfg.interpolation)
    views = []
    for image, p in zip(images, params):
        top, left, h, w = p.crop_tlhw
        view = TF.resized_crop(image, top, left, h, w, [cfg.img_size, cfg.img_size], interpolation=mode,
                               antialias=True)
        views.append(view.flip(-1) if p.flip else view)
    return torch.stack(views)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--photos", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per arm")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = ViewConfig()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        samples = list(open_source([write_photo_shards(Path(tmp), args.photos)]))
    blobs = [s.data for s in samples]
    src_hw = [tuple(decode_image(b).shape[1:]) for b in blobs[: args.batch]]
    params = [sample_view(cfg, s.key, 0, hw) for s, hw in zip(samples, src_hw)]
    batch_bytes = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs[: args.batch]]

    def pil_batch() -> torch.Tensor:
        return torch.stack([render_view(decode_image(b), p, cfg) for b, p in zip(blobs, params)])

    def nvjpeg_batch() -> torch.Tensor:
        return render_on_device(decode_jpeg(batch_bytes, device=device), params, cfg)

    def rate(fn, n_per_call: int) -> float:
        fn()
        sync()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds or n < 2:
            fn()
            sync()
            n += 1
        return n * n_per_call / (time.perf_counter() - start)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pil_rate = rate(pil_batch, len(params))
    torch.set_num_threads(threads)
    nv_rate = rate(nvjpeg_batch, len(params))
    decode_only = rate(lambda: decode_jpeg(batch_bytes, device=device), len(params))
    diff = (pil_batch().to(torch.int16) - nvjpeg_batch().cpu().to(torch.int16)).abs()
    out = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "torchvision": torchvision.__version__, "photos": len(blobs),
           "batch": len(params), "img": cfg.img_size, "interpolation": cfg.interpolation,
           "views_per_s": {"pil_1core": pil_rate, "nvjpeg_decode_render": nv_rate, "nvjpeg_decode_only": decode_only},
           "pil_vs_nvjpeg_pixels": {"max_abs_levels": int(diff.max()), "mean_abs_levels": float(diff.float().mean()),
                                    "share_equal": float((diff == 0).float().mean())}}
    print(json.dumps(out, indent=2))
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
