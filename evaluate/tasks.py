"""One evaluation task end to end: model + data in, the JSON record out (CLI and pipelines).

Feature tasks (kNN, probes) first make sure the frozen features of the model on each source
are in the feature cache (``features.frozen_features``: computed once, streamed, resumable),
then train and test from it. Image tasks (fine-tuning) stream the images every epoch. The
images that do not decode are found on the way (the cache's status, or one decoding pass) and
left out before a one-source split, so the split is the same for every task. Under torchrun
(WORLD_SIZE > 1) image tasks run in the process group (``finetune.process_group``), one device
per rank; feature tasks are refused there.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..devices import resolve_device
from ..errors import HgkdError
from ..storage.features import FeatureStore
from .data import CROP_PCT, LabelledSet, align_classes, drop_undecodable, keep_decodable, load_labelled, split
from .features import FeatureRows, decodable, frozen_features, model_device, rows_of
from .finetune import process_group
from .models import load_student
from .probe import MEMORY_MB, knn_eval, linear_probe
from .registry import TASKS, get_task

DEFAULT_BATCH = 64  # feature extraction and fine-tuning (batch_size None); detection takes its recipe's

log = logging.getLogger(__name__)


def run_task(task: str, model: str | nn.Module, train: str | list[str] | LabelledSet,
             test: str | list[str] | LabelledSet | None = None, *, test_fraction: float = 0.25,
             img_size: int = 224, crop_pct: float = CROP_PCT, seed: int = 0, device: str = "auto",
             batch_size: int | None = None, workers: int = 0, features_dir: str | Path | None = None,
             memory_mb: float = MEMORY_MB, **options: Any) -> dict[str, Any]:
    """Evaluate ``model`` (path, ``scratch:<arch>`` or a loaded timm backbone) on one registered task.

    ``task``: see ``hgkd.evaluate.registry`` - ``knn`` (options k, temperature), ``linear`` / ``mlp``
    (epochs, lr, weight_decay, probe_batch_size, and hidden for mlp) or ``finetune`` (epochs, lr,
    weight_decay, hidden, min_scale; ``batch_size`` is its batch). ``batch_size`` is otherwise the
    feature-extraction batch; ``workers`` the DataLoader workers that decode images.
    ``train``/``test`` are data specs or loaded sets; without a test set, a stratified
    ``test_fraction`` of ``train`` is held out. Frozen features are kept under ``features_dir``
    (reused by later tasks on the same model and data; default: a temporary folder) and probes
    load at most ``memory_mb`` of them at once. Returns the JSON record {task, model, top1, top5,
    n_train, n_test, n_classes, ...} (accuracies in percent).
    """
    spec = get_task(task)
    unknown = sorted(set(options) - spec.options)
    if unknown:
        raise HgkdError(f"{task}: unknown options {unknown}; it takes {sorted(spec.options)}")
    if spec.inputs == "detection":  # COCO-format data and its own trunk loading; batch: the recipe's unless given
        return spec.function()(model, train, test, seed=seed, device=device, workers=workers,
                               batch_size=batch_size, **options)
    batch_size = DEFAULT_BATCH if batch_size is None else batch_size
    if not isinstance(test, LabelledSet) and not test:
        test = None
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and spec.inputs == "features":
        raise HgkdError(f"{task} runs in one process; only finetune runs under torchrun (WORLD_SIZE={ranks})")
    start = time.perf_counter()
    dev = resolve_device(device, per_rank=ranks > 1)
    backbone = (load_student(model, seed=seed) if isinstance(model, str) else model).to(dev)
    train_set = _load(train, "--train", img_size, crop_pct)
    test_set = None if test is None else align_classes(train_set, _load(test, "--test", img_size, crop_pct))
    with ExitStack() as stack:
        if spec.inputs == "features":
            where = features_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="hgkd-features-"))
            train_set, test_set, result = _on_features(spec.name, backbone, train_set, test_set, where, seed,
                                                       test_fraction, batch_size, workers, memory_mb, options)
        else:
            train_set, test_set = _decodable_split(train_set, test_set, seed, test_fraction, workers)
            stack.enter_context(process_group(dev))
            result = spec.function()(backbone, train_set, test_set, seed=seed, batch_size=batch_size,
                                     workers=workers, **options)
    sources = [train_set] if test is None else [train_set, test_set]  # a split shares its source's counts
    record = {"task": task, "model": model if isinstance(model, str) else type(model).__name__,
              "top1": result.pop("top1"), "top5": result.pop("top5"), "n_train": len(train_set),
              "n_test": len(test_set), "n_classes": result.pop("n_classes"),
              "train": train_set.name, "test": test_set.name if test is not None else None,
              "test_fraction": None if test is not None else test_fraction,
              "img_size": train_set.img_size, "crop_pct": train_set.crop_pct, "seed": seed, "device": str(dev),
              "skipped_unlabelled": sum(s.skipped_unlabelled for s in sources),
              "skipped_undecodable": sum(s.skipped_undecodable for s in sources)}
    record.update({k: v for k, v in result.items() if k not in ("n_train", "n_test")})
    record["seconds"] = time.perf_counter() - start
    return record


def _load(data: str | list[str] | LabelledSet, option: str, img_size: int, crop_pct: float) -> LabelledSet:
    if isinstance(data, LabelledSet):
        return data
    return load_labelled(data, img_size, crop_pct, option=option, check=False)


def _decodable_split(train: LabelledSet, test: LabelledSet | None, seed: int, test_fraction: float,
                     workers: int) -> tuple[LabelledSet, LabelledSet]:
    train = drop_undecodable(train, workers, "--train")
    if test is None:
        return split(train, test_fraction, seed)
    return train, drop_undecodable(test, workers, "--test")


def _on_features(task: str, backbone: nn.Module, train: LabelledSet, test: LabelledSet | None,
                 features_dir: str | Path, seed: int, test_fraction: float, batch_size: int, workers: int,
                 memory_mb: float, options: dict[str, Any]) -> tuple[LabelledSet, LabelledSet, dict[str, Any]]:
    """Features of both sets from the cache (computed if missing), then the task on them."""
    begin = time.perf_counter()
    train, train_store = _with_features(backbone, train, "--train", features_dir, batch_size, workers)
    if test is None:
        test_store = train_store
        train, test = split(train, test_fraction, seed)
    else:
        test, test_store = _with_features(backbone, test, "--test", features_dir, batch_size, workers)
    feature_seconds = time.perf_counter() - begin
    train_f = FeatureRows(train_store, rows_of(train_store, train))
    test_f = FeatureRows(test_store, rows_of(test_store, test))
    result = get_task(task).function()(train_f, train.labels, test_f, test.labels, seed=seed,
                                        device=model_device(backbone), memory_mb=memory_mb, name=task, **options)
    return train, test, {**result, "feature_seconds": feature_seconds, "features_dir": str(features_dir)}


def _with_features(backbone: nn.Module, data: LabelledSet, option: str, features_dir: str | Path, batch_size: int,
                   workers: int) -> tuple[LabelledSet, FeatureStore]:
    """``data`` without its undecodable images, and the complete feature cache of its source."""
    store = frozen_features(backbone, data, features_dir, batch_size, workers)
    return keep_decodable(data, decodable(store, data), option), store


def knn_task(train: FeatureRows | Tensor, train_y: Tensor, test: FeatureRows | Tensor, test_y: Tensor, *,
             seed: int, device: Any, memory_mb: float, name: str, **options: Any) -> dict[str, Any]:
    """The ``knn`` task: ``probe.knn_eval`` over the feature bank (seed, device: unused)."""
    return knn_eval(train, train_y, test, test_y, **options)


def probe_task(train: FeatureRows | Tensor, train_y: Tensor, test: FeatureRows | Tensor, test_y: Tensor, *,
               seed: int, device: Any, memory_mb: float, name: str, **options: Any) -> dict[str, Any]:
    """The ``linear`` and ``mlp`` tasks: ``probe.linear_probe`` with the head ``name``."""
    opts = dict(options)
    opts["batch_size"] = opts.pop("probe_batch_size", 256)
    return linear_probe(train, train_y, test, test_y, head=name, seed=seed, device=device, memory_mb=memory_mb,
                        **opts)


def summary_line(record: dict[str, Any]) -> str:
    k5 = record.get("top5_k", 5)
    return (f"{record['task']} {record['model']}: top-1 {record['top1']:.2f}%  top-{k5} {record['top5']:.2f}%  "
            f"({record['n_train']} train / {record['n_test']} test images, {record['n_classes']} classes)")


__all__ = ["TASKS", "run_task", "summary_line"]
