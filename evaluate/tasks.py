"""One evaluation task end to end: model + data in, the JSON record out (CLI and pipelines)."""
from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from ..errors import HgkdError
from .data import CROP_PCT, LabelledSet, load_train_test, split
from .finetune import finetune
from .models import load_student, resolve_device
from .probe import extract_features, knn_eval, linear_probe, model_device

log = logging.getLogger(__name__)

TASKS = ("knn", "linear", "mlp", "finetune")
_PROBE = {"epochs", "lr", "weight_decay", "probe_batch_size"}
OPTIONS = {"knn": {"k", "temperature"}, "linear": _PROBE, "mlp": _PROBE | {"hidden"},
           "finetune": {"epochs", "lr", "weight_decay", "hidden", "min_scale"}}


def run_task(task: str, model: str | nn.Module, train: str | list[str] | LabelledSet,
             test: str | list[str] | LabelledSet | None = None, *, test_fraction: float = 0.25,
             img_size: int = 224, crop_pct: float = CROP_PCT, seed: int = 0, device: str = "auto",
             batch_size: int = 64, workers: int = 0, **options: Any) -> dict[str, Any]:
    """Evaluate ``model`` (path, ``scratch:<arch>`` or a loaded timm backbone) on one task.

    ``task``: ``knn`` (options k, temperature), ``linear`` / ``mlp`` (the probe's head; options
    epochs, lr, weight_decay, probe_batch_size, and hidden for mlp) or ``finetune`` (epochs, lr,
    weight_decay, hidden, min_scale; ``batch_size`` is its batch). ``batch_size`` is otherwise the
    feature-extraction batch. ``train``/``test`` are data specs or already loaded sets; without a
    test set, a stratified ``test_fraction`` of ``train`` is held out. Returns the JSON record
    {task, model, top1, top5, n_train, n_test, n_classes, ...} (accuracies in percent).
    """
    if task not in TASKS:
        raise HgkdError(f"unknown evaluation task {task!r}; choose from {list(TASKS)}")
    unknown = sorted(set(options) - OPTIONS[task])
    if unknown:
        raise HgkdError(f"{task}: unknown options {unknown}; it takes {sorted(OPTIONS[task])}")
    if not isinstance(test, LabelledSet) and not test:
        test = None
    start = time.perf_counter()
    dev = resolve_device(device)
    backbone = (load_student(model, seed=seed) if isinstance(model, str) else model).to(dev)
    train_set, test_set = _sets(train, test, img_size, test_fraction, seed, crop_pct)
    result = _measure(task, backbone, train_set, test_set, seed, batch_size, workers, options)
    sources = [train_set] if test is None else [train_set, test_set]  # a split shares its source's counts
    record = {"task": task, "model": model if isinstance(model, str) else type(model).__name__,
              "top1": result.pop("top1"), "top5": result.pop("top5"), "n_train": len(train_set),
              "n_test": len(test_set), "n_classes": result.pop("n_classes"),
              "train": train_set.name, "test": test_set.name if test is not None else None,
              "test_fraction": None if test is not None else test_fraction,
              "img_size": train_set.img_size, "crop_pct": crop_pct, "seed": seed, "device": str(dev),
              "skipped_unlabelled": sum(s.skipped_unlabelled for s in sources),
              "skipped_undecodable": sum(s.skipped_undecodable for s in sources)}
    record.update({k: v for k, v in result.items() if k not in ("n_train", "n_test")})
    record["seconds"] = time.perf_counter() - start
    return record


def _measure(task: str, backbone: nn.Module, train_set: LabelledSet, test_set: LabelledSet, seed: int,
             batch_size: int, workers: int, options: dict[str, Any]) -> dict[str, Any]:
    if task == "finetune":
        return finetune(backbone, train_set, test_set, seed=seed, batch_size=batch_size, workers=workers, **options)
    train_feats = extract_features(backbone, train_set, batch_size, workers)
    test_feats = extract_features(backbone, test_set, batch_size, workers)
    if task == "knn":
        return knn_eval(train_feats, train_set.labels, test_feats, test_set.labels, **options)
    probe_opts = dict(options)
    probe_opts["batch_size"] = probe_opts.pop("probe_batch_size", 256)
    return linear_probe(train_feats, train_set.labels, test_feats, test_set.labels, head=task, seed=seed,
                        device=model_device(backbone), **probe_opts)


def _sets(train: str | list[str] | LabelledSet, test: str | list[str] | LabelledSet | None, img_size: int,
          test_fraction: float, seed: int, crop_pct: float) -> tuple[LabelledSet, LabelledSet]:
    if isinstance(train, LabelledSet):
        if test is None:
            return split(train, test_fraction, seed)
        if not isinstance(test, LabelledSet):
            raise TypeError("give train and test both as LabelledSets or both as data specs")
        return train, test
    return load_train_test(train, test, img_size, test_fraction, seed, crop_pct)


def summary_line(record: dict[str, Any]) -> str:
    k5 = record.get("top5_k", 5)
    return (f"{record['task']} {record['model']}: top-1 {record['top1']:.2f}%  top-{k5} {record['top5']:.2f}%  "
            f"({record['n_train']} train / {record['n_test']} test images, {record['n_classes']} classes)")
