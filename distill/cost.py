"""The cost ledger of a distillation run, ``RUN/cost.json`` (issue 12, item 5).

What a run consumed, so a sweep can show what each configuration cost and what the cache
saved. Counters accumulate across resumes: the ledger's state travels in every checkpoint,
and ``cost.json`` is written atomically at every checkpoint and at the end of a run.

- ``teacher_forwards``: cached path, the number of *distinct* cached views used so far
  (each cost one teacher forward at extraction; re-reading a view is free), queue pre-fill
  included; online teacher, the live teacher forwards done (one per student image, and one per
  image of the queue pre-fill).
- ``student_images``, ``steps``: images the student trained on (all ranks), optimizer steps.
- ``wall_s``: wall time of the run's processes up to the last write (time after the last
  checkpoint of a crashed process is not counted: those steps are redone).
- ``cache_views_read``: cached views read (with repeats); ``cache_bytes_read``: an estimate,
  the cache's stored bytes per view times the views read (``cache_bytes_read_method`` says
  so); the queue pre-fill's pooled reads are left out.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

COST_FILE = "cost.json"
BYTES_METHOD = "estimate: cache stored bytes per view x views read"
COUNTERS = ("teacher_forwards", "student_images", "steps", "wall_s", "cache_views_read")


@dataclass
class RunCost:
    """One run's ``cost.json``."""

    method: str
    targets: str  # "cache", "online" (live MIM teacher) or "classifier" (supervised baselines)
    cache: str | None  # cache path (cached path only)
    views: int  # K views per image cycled over epochs (view e mod K); 0 = a fresh view every epoch
    student_mask: str  # "cached" or "fresh"
    teacher_forwards: int = 0
    student_images: int = 0
    steps: int = 0
    wall_s: float = 0.0
    cache_views_read: int = 0
    cache_bytes_read: int = 0
    cache_bytes_per_view: float = 0.0
    cache_bytes_read_method: str = BYTES_METHOD

    def save(self, run_dir: Path) -> Path:
        """Write ``run_dir/cost.json`` atomically (temp file + rename)."""
        path = run_dir / COST_FILE
        tmp = run_dir / f".{COST_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path


class CostLedger:
    """Accumulates a :class:`RunCost` step by step; ``state()`` goes into the checkpoint.

    ``cache_rows`` > 0: a bitmap of the cache rows used, so each cached view counts once.
    """

    def __init__(self, cost: RunCost, cache_rows: int = 0) -> None:
        self.cost = cost
        self._seen = np.zeros(cache_rows, bool) if cache_rows else None
        self._wall_base, self._start = 0.0, time.perf_counter()

    def use_views(self, rows: np.ndarray) -> int:
        """Mark cache rows as used; returns how many were new (teacher forwards consumed)."""
        if self._seen is None or not len(rows):
            return 0
        rows = np.unique(np.asarray(rows, np.int64))
        new = int((~self._seen[rows]).sum())
        self._seen[rows] = True
        self.cost.teacher_forwards += new
        return new

    def add_forwards(self, live_forwards: int) -> None:
        """Live teacher forwards outside a step (an online run's queue pre-fill)."""
        self.cost.teacher_forwards += live_forwards

    def add_step(self, rows: np.ndarray, images: int, live_forwards: int = 0) -> None:
        """One optimizer step over ``images`` student images read from cache ``rows`` (all ranks)."""
        cost = self.cost
        cost.steps += 1
        cost.student_images += images
        cost.teacher_forwards += live_forwards
        if self._seen is not None:
            self.use_views(rows)
            cost.cache_views_read += len(rows)

    def snapshot(self) -> RunCost:
        """The ledger now (wall time up to this call)."""
        cost = self.cost
        cost.wall_s = self._wall_base + time.perf_counter() - self._start
        cost.cache_bytes_read = int(round(cost.cache_views_read * cost.cache_bytes_per_view))
        return cost

    def state(self) -> dict[str, Any]:
        cost = self.snapshot()
        state: dict[str, Any] = {name: getattr(cost, name) for name in COUNTERS}
        if self._seen is not None:
            state["seen_rows"] = len(self._seen)
            state["seen"] = torch.from_numpy(np.packbits(self._seen))
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ledger (a cache that grew since keeps its old bitmap)."""
        for name in COUNTERS:
            setattr(self.cost, name, type(getattr(self.cost, name))(state[name]))
        self._wall_base, self._start = float(state["wall_s"]), time.perf_counter()
        if self._seen is not None and "seen" in state:
            seen = np.unpackbits(state["seen"].numpy(), count=int(state["seen_rows"])).astype(bool)
            self._seen[: len(seen)] = seen[: len(self._seen)]
