"""``--sparse-backend auto``: the sparse backend that runs, and runs fastest, on the device in use
(issue 20, item 1).

All three sparse backends compute the same function (``tests/test_students.py`` proves
``masked`` and ``rows`` equal to MinkowskiEngine: values, active sites, gradients, BN
statistics), so the choice changes speed only. The order per device type is the P4
measurement (student encoder fwd+bwd at mask ratio 0.6, ResNet-50, worst batch x mask
granularity) in ``benchmarks/results/distill.json`` (CPU) and ``benchmarks/results/gpu_run*.json``
(CUDA); the first backend of the list that can run here is taken. MinkowskiEngine can run
where it imports and, on a GPU, was built with CUDA.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

# Fastest first, per device type (P4; see the module docstring for the measurement files).
MEASURED_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("rows", "masked", "minkowski"),  # distill.json: rows 0.72-0.95x dense, masked 1.19-1.27x, ME 1.0-1.22x
    # gpu_run1.json (H200, bf16, batch 128, 224 px): rows 1.12-1.18x dense at ResNet-50, masked 2.2-2.7x;
    # gpu_run2.json (fp32): MinkowskiEngine 3.46-3.61x, rows 1.16-1.21x
    "cuda": ("rows", "masked", "minkowski"),
}
FALLBACK_ORDER = ("masked", "rows")  # other devices: plain torch ops only


@dataclass(frozen=True)
class BackendChoice:
    """The backend ``auto`` resolved to on a device, and why (printed once, saved in the run)."""

    name: str
    reason: str


def minkowski_runs_on(device: torch.device) -> bool:
    """MinkowskiEngine imports and supports ``device`` (a CUDA build for a GPU)."""
    if device.type not in ("cpu", "cuda") or importlib.util.find_spec("MinkowskiEngine") is None:
        return False
    from .minkowski import import_minkowski

    try:
        me = import_minkowski()
    except Exception:  # noqa: BLE001 - a broken install is "cannot run here", said in the reason
        return False
    return device.type == "cpu" or bool(me.is_cuda_available())


def choose_sparse_backend(requested: str, device: torch.device) -> BackendChoice:
    """``requested`` itself unless it is ``"auto"``; else the measured-fastest backend that runs."""
    if requested != "auto":
        return BackendChoice(requested, "chosen with --sparse-backend")
    order = MEASURED_ORDER.get(device.type, FALLBACK_ORDER)
    for name in order:
        if name != "minkowski" or minkowski_runs_on(device):
            skipped = order[: order.index(name)]
            note = f"; {', '.join(skipped)} cannot run here" if skipped else ""
            return BackendChoice(name, f"auto: fastest measured on {device.type} "
                                       f"(order {' > '.join(order)}){note}")
    raise AssertionError("unreachable: the torch backends run everywhere")
