"""Stage two's check that the student will see the teacher's pixels (issue 20, item 2).

The cache keeps a few of the teacher's views pixel for pixel (``storage.fingerprint``); before
training, the run renders the same rows with its own decoder on its own device, through the
very path its batches take (``CacheViewDataset`` then ``Batch.ready``), and compares. Any
difference is one line with the measured size: an error, or a warning with
``--allow-decoder-mismatch``. Never silent.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import HgkdError
from ..storage.fingerprint import read_fingerprint
from .data import CacheViewDataset

log = logging.getLogger(__name__)


def check_teacher_pixels(dataset: CacheViewDataset, device: torch.device, allow_mismatch: bool = False) -> str:
    """Compare the cache's fingerprint views with this run's rendering; returns what was found."""
    found = read_fingerprint(dataset.cache)
    if found is None:
        return f"{dataset.cache_url}: no pixel fingerprint (made before issue 20): pixels not checked"
    rows, stored_nchw = found
    order = np.argsort(rows)
    batch = dataset[list(rows[order])].to(device).ready()
    rendered = batch.images.cpu().to(torch.int16)
    diff = (rendered - torch.from_numpy(stored_nchw[order]).to(torch.int16)).abs()
    made_by = dataset.view_cfg.decoder
    if not diff.any():
        return f"pixels checked: decoder {dataset.decoder!r} on {device} renders the teacher's views exactly"
    message = (f"--cache {dataset.cache_url}: its teacher saw views decoded by {made_by!r}; decoder "
               f"{dataset.decoder!r} on {device} renders them differently (max {int(diff.max())} levels, "
               f"{100 * float((diff > 0).float().mean()):.1f}% of pixels of {len(rows)} views); use --decoder "
               f"{made_by} (on the kind of machine that made the cache), or --allow-decoder-mismatch to train on "
               f"other pixels anyway")
    if not allow_mismatch:
        raise HgkdError(message)
    log.warning(message)
    return message
