"""The pipeline's evaluation stage: ``hgkd.evaluate.run_task`` with the labelled sets loaded once."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..evaluate import LabelledSet, load_train_test, run_task
from .spec import EvalSpec


@lru_cache(maxsize=2)
def _sets(train: tuple[str, ...], test: tuple[str, ...], img_size: int, test_fraction: float) -> tuple[LabelledSet, LabelledSet]:
    return load_train_test(list(train), list(test) or None, img_size=img_size, test_fraction=test_fraction)


def evaluate_task(task: str, model: str, spec: EvalSpec) -> dict[str, Any]:
    train, test = _sets(tuple(spec.train), tuple(spec.test), spec.img_size, spec.test_fraction)
    return run_task(task, model, train, test, img_size=spec.img_size, **spec.options.get(task, {}))
