"""Seconds per view of a teacher's forward, measured (issue 22, P7): what a live teacher adds to
every student image of a sweep that does not read a cache.

The views are real ones (``prepare_sample`` on the first images of the data); the forward runs
as extraction runs it (``Teacher.targets``, the run's device and precision), timed after a
warm-up, device synchronised.
"""
from __future__ import annotations

import time
from itertools import islice

import torch

from ..data.sources import open_source
from ..devices import resolve_device
from .config import ExtractConfig
from .run import autocast_dtype, load_teacher, prepare_sample


@torch.no_grad()
def teacher_seconds_per_view(cfg: ExtractConfig, views: int = 64, repeats: int = 3) -> float:
    """Median over ``repeats`` of one forward of ``views`` views, divided by ``views``."""
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg, device)
    prepared = [p for p in (prepare_sample(s, cfg.view) for s in islice(open_source(cfg.data), views))
                if p.views_kchw is not None]
    if not prepared:
        raise ValueError("no decodable image to time the teacher on")
    images = torch.cat([p.views_kchw for p in prepared])[:views].to(device)
    masks = torch.cat([torch.from_numpy(v.mask_hw.reshape(1, -1)) for p in prepared for v in p.params])[:views]
    amp = autocast_dtype(cfg.precision, device)
    full = cfg.view.teacher_view == "full"

    def forward() -> float:
        start = time.perf_counter()
        teacher.targets(images, masks, full_view=full, amp=amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    forward()  # warm-up (kernels, allocator)
    times = sorted(forward() for _ in range(repeats))
    return times[len(times) // 2] / len(images)
