"""The pipeline's evaluation stage: ``hgkd.evaluate.run_task`` with the labelled sets indexed once.

The sets are indexed, not decoded (``load_labelled(check=False)``); features go to the spec's
``features_dir`` (``<out>/features``), so kNN and the probes of one student share one pass
over the images.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ..evaluate import LabelledSet, load_labelled, run_task
from ..evaluate.registry import get_task
from .spec import EvalSpec


@lru_cache(maxsize=4)
def _labelled(data: tuple[str, ...], img_size: int, option: str) -> LabelledSet:
    return load_labelled(list(data), img_size=img_size, option=option, check=False)


def evaluate_task(task: str, model: str, spec: EvalSpec, seed: int = 0, out: Path | None = None) -> dict[str, Any]:
    """``seed``: the run's (probe initialisation and order, a held-out split, a scratch trunk).
    ``out``: where the record will be kept (a detection task writes its detections beside it)."""
    registered, options = spec.task_of(task)
    if get_task(registered).inputs == "detection":  # COCO-format sets of its own, named in its options
        train, test = options.pop("train", spec.train), options.pop("test", spec.test or None)
        return run_task(registered, model, train, test, seed=seed, workers=spec.workers,
                        **({"out": str(out)} if out is not None else {}), **options)
    train = _labelled(tuple(spec.train), spec.img_size, "--train")
    test = _labelled(tuple(spec.test), spec.img_size, "--test") if spec.test else None
    return run_task(registered, model, train, test, img_size=spec.img_size, test_fraction=spec.test_fraction,
                    features_dir=spec.features_dir, workers=spec.workers, memory_mb=spec.memory_mb, seed=seed,
                    **options)
