"""Frozen MIM ViT teachers (MAE, BEiT, CAE) behind one registry, timm-style.

``create_teacher('cae_large_patch16', checkpoint='cae_large_1600ep.pth')`` builds, loads and
freezes a teacher; ``teacher.forward_masked(images_bchw, mask_bn)`` returns
``(tokens_bnc, valid_bn)`` over all patch positions. A new teacher's name also goes in
``hgkd.registry.TEACHER_NAMES`` (what ``--help`` lists; a test keeps the two equal).
"""
from . import beit, cae, mae  # noqa: F401  (importing registers the factories)
from .base import (
    TEACHERS,
    Teacher,
    create_teacher,
    list_teachers,
    load_checkpoint_file,
    load_teacher_checkpoint,
    register_teacher,
    sha256_file,
)

__all__ = [
    "TEACHERS", "Teacher", "create_teacher", "list_teachers", "load_checkpoint_file",
    "load_teacher_checkpoint", "register_teacher", "sha256_file",
]
