"""Evaluation of students as dense timm models: kNN, linear/MLP probe, fine-tuning.

This room knows only dense timm models and labelled images; it never imports ``hgkd.distill``
or the sparse backend. ``run_task`` is what ``hgkd-evaluate`` and the pipelines call.
The names below are imported from their module on first use, so that importing
``hgkd.evaluate.cli`` (``hgkd-evaluate --help``) does not import torch.
"""
from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import Any

_HOMES = {"LabelledSet": "data", "load_labelled": "data", "load_train_test": "data", "split": "data",
          "finetune": "finetune", "load_student": "models", "extract_features": "probe", "knn_eval": "probe",
          "linear_probe": "probe", "TASKS": "registry", "get_task": "registry", "run_task": "tasks",
          "frozen_features": "features", "FeatureRows": "features"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """``hgkd.evaluate.run_task`` and the rest: imported from their module when first asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(ModuleType):
    """Importing the submodule ``finetune`` binds the function of that name here, not the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and _HOMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
