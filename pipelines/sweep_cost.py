"""What a sweep cost with its caches, against the same sweep with a live teacher (issue 22, P7).

``sweep_cost.json`` in the pipeline's folder, from measured parts only:

- each cache once, from its own record (``FeatureCache.cost_summary``): the teacher forwards it
  spent and the process-seconds its extraction took (shard completion records);
- each MIM run's ``RUN/cost.json``: wall seconds, student images, teacher forwards;
- the teacher's seconds per view, measured on the pipeline's data with each cache's teacher
  and view settings (``extract.teacher_timing``).

The live-teacher sweep runs every cached run with the teacher computing its targets instead:
its wall seconds plus one teacher forward per student image; online runs count as they ran.
``p7`` = cached sweep seconds / live sweep seconds (lower: the cache saves more).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..distill.cost import COST_FILE
from ..extract.config import ExtractConfig
from ..extract.teacher_timing import teacher_seconds_per_view
from ..storage.cache import FeatureCache

SWEEP_COST_FILE = "sweep_cost.json"


def sweep_cost(out_dir: Path, run_caches: dict[str, str | None], cache_configs: dict[str, ExtractConfig]) -> dict[str, Any]:
    """``run_caches``: MIM run name -> the cache it read (None: online); ``cache_configs``: each
    cache's extraction settings (for timing its teacher). Writes and returns ``sweep_cost.json``."""
    caches = {}
    for url in sorted({u for u in run_caches.values() if u is not None}):
        summary = FeatureCache.open(url).cost_summary()
        caches[url] = {"teacher_forwards": summary["teacher_forwards"], "extraction_seconds": summary["extraction_seconds"],
                       "bytes_stored": summary["bytes_stored"],
                       "teacher_seconds_per_view": teacher_seconds_per_view(cache_configs[url])}
    runs = {}
    for name, url in run_caches.items():
        cost = json.loads((out_dir / "runs" / name / COST_FILE).read_text())
        per_view = caches[url]["teacher_seconds_per_view"] if url is not None else 0.0
        runs[name] = {"targets": cost["targets"], "cache": url, "wall_s": cost["wall_s"],
                      "student_images": cost["student_images"], "teacher_forwards": cost["teacher_forwards"],
                      "live_wall_s": cost["wall_s"] + cost["student_images"] * per_view}
    unknown = [url for url, c in caches.items() if c["extraction_seconds"] is None]
    cached = sum(c["extraction_seconds"] or 0.0 for c in caches.values()) + sum(r["wall_s"] for r in runs.values())
    live = sum(r["live_wall_s"] for r in runs.values())
    result = {
        "caches": caches, "runs": runs,
        "cached_sweep_seconds": cached, "live_sweep_seconds": live,
        "cached_teacher_forwards": sum(c["teacher_forwards"] for c in caches.values())
        + sum(r["teacher_forwards"] for r in runs.values() if r["cache"] is None),
        "live_teacher_forwards": sum(r["student_images"] if r["cache"] else r["teacher_forwards"] for r in runs.values()),
        "p7": cached / live if live and not unknown else None,
        "note": ("caches without recorded extraction times (made before issue 22): p7 not computed: " + ", ".join(unknown))
        if unknown else "live sweep: every cached run's wall seconds plus one measured teacher forward per student image",
    }
    (out_dir / SWEEP_COST_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result
