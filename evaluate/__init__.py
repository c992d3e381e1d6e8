"""Evaluation of students as dense timm models: kNN, linear/MLP probe, fine-tuning.

This room knows only dense timm models and labelled images; it never imports ``hgkd.distill``
or the sparse backend. ``run_task`` is what ``hgkd-evaluate`` and the pipelines call.
"""
from .data import LabelledSet, load_labelled, load_train_test, split
from .finetune import finetune
from .models import load_student
from .probe import extract_features, knn_eval, linear_probe
from .tasks import TASKS, run_task

__all__ = ["LabelledSet", "TASKS", "extract_features", "finetune", "knn_eval", "linear_probe", "load_labelled",
           "load_student", "load_train_test", "run_task", "split"]
