"""Student encoders of H-GKD (Sec. 3.2.1): sparse timm ResNets, one registry looked up by name.

``create_encoder('resnet50', backend='minkowski')`` mirrors timm's ``create_model``; every
factory returns a :class:`SparseResNetEncoder` whose ``body`` is a timm ResNet.
"""
from __future__ import annotations

from typing import Any

from ...registry import Registry
from .encoder import BACKENDS, STRIDES, SparseResNetEncoder, import_minkowski

STUDENT_ENCODERS: Registry[SparseResNetEncoder] = Registry("student encoder")


@STUDENT_ENCODERS.register
def resnet18(backend: str = "minkowski", **kwargs: Any) -> SparseResNetEncoder:
    return SparseResNetEncoder("resnet18", backend, **kwargs)


@STUDENT_ENCODERS.register
def resnet34(backend: str = "minkowski", **kwargs: Any) -> SparseResNetEncoder:
    return SparseResNetEncoder("resnet34", backend, **kwargs)


@STUDENT_ENCODERS.register
def resnet50(backend: str = "minkowski", **kwargs: Any) -> SparseResNetEncoder:
    return SparseResNetEncoder("resnet50", backend, **kwargs)


def create_encoder(name: str, backend: str = "minkowski", **kwargs: Any) -> SparseResNetEncoder:
    """The registered student encoder ``name``; ``backend`` in :data:`BACKENDS`.

    Raises HgkdError for an unknown name or backend, or when ``backend='minkowski'`` and
    MinkowskiEngine cannot be imported (the message says to use ``--sparse-backend masked``).
    """
    return STUDENT_ENCODERS.create(name, backend=backend, **kwargs)


__all__ = ["BACKENDS", "STRIDES", "STUDENT_ENCODERS", "SparseResNetEncoder", "create_encoder", "import_minkowski"]
