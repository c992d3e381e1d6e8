"""The evaluation-task registry: every task ``hgkd-evaluate`` and pipelines can run, by name.

Torch-free, so that ``--help`` and pipeline-file validation list and check tasks without
importing torch: a task names its implementation like an entry point (``module:function``),
imported when the task first runs (``hgkd.evaluate.tasks.run_task``). Adding a task is one
``register_task(EvalTask(...))`` line here plus its function. The two kinds of input:

* ``features``: ``fn(train, train_y, test, test_y, *, seed, device, memory_mb, name, **options)``
  on frozen features (tensors or ``FeatureRows`` of the feature cache);
* ``images``: ``fn(backbone, train, test, *, seed, batch_size, workers, **options)`` on
  ``LabelledSet``s, streamed image by image;
* ``detection``: ``fn(model, train, test, *, seed, device, batch_size, workers, **options)`` on
  COCO-format data (annotation JSON specs, their image folders among the options), streamed
  image by image; it loads the trunk itself (``model``: a ``--model`` spec or a timm ResNet)
  and returns the whole record (AP per iou type, no top-1). Its options may name its own
  ``train`` / ``test`` annotations, for a pipeline whose ``eval`` data are classification sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable

from ..registry import Registry
from .detection_recipe import RECIPE_OPTIONS

INPUTS = ("features", "images", "detection")
PROBE_OPTIONS = frozenset({"epochs", "lr", "weight_decay", "probe_batch_size"})


@dataclass(frozen=True)
class EvalTask:
    """One evaluation: its name, the options it takes, what it reads and where it is implemented."""

    name: str
    options: frozenset[str]
    inputs: str  # one of INPUTS
    entry_point: str  # "hgkd.evaluate.<module>:<function>"
    summary: str = ""

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"task {self.name}: inputs {self.inputs!r} not in {INPUTS}")

    def function(self) -> Callable[..., dict[str, Any]]:
        module, _, attr = self.entry_point.partition(":")
        return getattr(import_module(module), attr)


TASKS: Registry[EvalTask] = Registry("evaluation task")


def register_task(task: EvalTask) -> EvalTask:
    TASKS.register_as(task.name)(task)
    return task


def get_task(name: str) -> EvalTask:
    """The registered task ``name``; one line naming the choices otherwise."""
    return TASKS.get(name)


register_task(EvalTask("knn", frozenset({"k", "temperature"}), "features", "hgkd.evaluate.tasks:knn_task",
                       "weighted kNN (cosine, exp(sim/T) votes) over the frozen-feature bank"))
register_task(EvalTask("linear", PROBE_OPTIONS, "features", "hgkd.evaluate.tasks:probe_task",
                       "one Linear layer on standardised frozen features"))
register_task(EvalTask("mlp", PROBE_OPTIONS | {"hidden"}, "features", "hgkd.evaluate.tasks:probe_task",
                       "the paper's Linear-ReLU-Linear head on standardised frozen features"))
register_task(EvalTask("finetune", frozenset({"epochs", "lr", "weight_decay", "hidden", "min_scale", "labels_per_class",
                                               "checkpoint_dir", "resume"}),
                       "images",
                       "hgkd.evaluate.finetune:finetune", "backbone + MLP head trained end to end on augmented images"))
DETECTION_OPTIONS = RECIPE_OPTIONS | {"batch_size", "train", "train_images", "test", "test_images", "out",
                                      "checkpoint_dir", "checkpoint_every", "resume", "progress"}
register_task(EvalTask("detection", DETECTION_OPTIONS, "detection",
                       "hgkd.evaluate.detection:detection_task",
                       "Faster/Mask R-CNN + FPN on the trunk, fine-tuned (COCO 1x recipe), COCOeval box/mask AP"))
