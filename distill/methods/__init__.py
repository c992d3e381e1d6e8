"""Distillation methods, one module each, listed in one registry (``--method NAME``).

H-GKD (this project's method) and the baselines: ICD (+KD), HSAKD, KD, DIST, CRD, RKD, PKT,
FitNet, AT, SP, and ``vanilla`` (labels only, no teacher). Adding a method: one file with a ``@register_method("name")`` class, plus
its import line below and its name in ``hgkd.registry.METHOD_NAMES`` (what ``--help`` lists).
"""
from .base import (METHODS, DistillMethod, MethodContext, NetDims, create_method, kd_loss, method_class,
                   method_options)
from . import at, crd, dist, fitnet, hgkd, hsakd, icd, kd, pkt, rkd, sp, vanilla  # noqa: F401  (registration)

__all__ = ["METHODS", "DistillMethod", "MethodContext", "NetDims", "create_method", "kd_loss", "method_class",
           "method_options"]
