"""Frozen masked-image-modeling ViT teachers: the common interface, registry and checkpoint IO.

H-GKD (Sec. 3.1, Sec. 4.1) distils a frozen ViT-L/16 pre-trained by MAE (He et al. 2022),
BEiT (Bao et al. 2021) or CAE (Chen et al. 2022; the paper's default) into a sparse CNN.
Each teacher reads the student's masked view and returns one token per patch position
(cls dropped) plus a per-token validity mask, which the MSE loss uses to ignore positions
a teacher has no output for (MAE's masked patches).

Checkpoints are the official release files, read with ``torch.load(weights_only=True)``;
each family adapts the official key layout with its own ``checkpoint_filter_fn(state_dict,
model)`` (timm convention) before a strict ``load_state_dict``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...errors import HgkdError
from ...pixels import normalize_uint8, pixel_stats
from ...registry import Registry
from .layers import visible_counts

__all__ = [
    "TEACHERS", "Teacher", "create_teacher", "list_teachers", "load_checkpoint_file",
    "load_teacher_checkpoint", "register_teacher", "sha256_file",
]

StateDict = dict[str, Tensor]

# Types besides tensors and builtins that official training checkpoints pickle:
# MAE/BEiT/CAE's `utils.save_model` stores the run's `argparse.Namespace` under 'args'.
CHECKPOINT_SAFE_GLOBALS: list[Any] = [argparse.Namespace]
# Keys under which official files nest the weights, tried in this order.
CONTAINER_KEYS = ("model", "module", "state_dict", "model_ema")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class Teacher(nn.Module):
    """A frozen MIM ViT that maps a (masked) view to per-patch tokens.

    Attributes: ``patch_size``, ``grid_size`` (h, w), ``img_size``, ``embed_dim`` (width of
    the returned tokens), ``mean``/``std`` (the normalization the images must already carry),
    ``family`` ('mae' | 'beit' | 'cae'), ``outputs_masked_tokens`` (False when masked
    positions get no output, i.e. MAE), ``visible_only`` (the encoder drops masked patches,
    so a batch needs equal visible counts or a per-sample loop), ``teacher_name`` and
    ``checkpoint_path`` (set by :func:`create_teacher`).
    """

    family: str = ""
    outputs_masked_tokens: bool = True
    visible_only: bool = False
    patch_size: int
    grid_size: tuple[int, int]
    img_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    teacher_name: str = ""
    checkpoint_path: str | None = None

    def _set_teacher_attrs(
        self, img_size: int, patch_size: int, embed_dim: int,
        mean: tuple[float, ...], std: tuple[float, ...],
    ) -> None:
        """Record the geometry and normalization every teacher exposes."""
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        self.grid_size = (self.img_size // self.patch_size, self.img_size // self.patch_size)
        self.embed_dim = int(embed_dim)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, images_bchw: Tensor, mask_bn: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward_masked(images_bchw, mask_bn)

    def forward_masked(
        self, images_bchw: Tensor, mask_bn: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Tokens for all N = h*w patch positions of a (masked) view.

        ``images_bchw``: float images already normalized with ``mean``/``std``.
        ``mask_bn``: bool, True = patch hidden from the teacher; ``None`` = the teacher sees
        the full image (``teacher_view=full``) and every token is valid.
        Returns ``(tokens_bnc, valid_bn)``; invalid tokens are zeros.

        Visible-only encoders (MAE, CAE) batch samples with equal visible counts (the fixed
        mask ratio used in practice) and fall back to one sample at a time otherwise.
        """
        self._check_inputs(images_bchw, mask_bn)
        if mask_bn is None or not self.visible_only:
            return self._forward_masked(images_bchw, mask_bn)
        counts = visible_counts(mask_bn)
        if bool((counts == counts[0]).all()):
            return self._forward_masked(images_bchw, mask_bn)
        outs = [self._forward_masked(images_bchw[i:i + 1], mask_bn[i:i + 1])
                for i in range(images_bchw.shape[0])]
        return torch.cat([t for t, _ in outs]), torch.cat([v for _, v in outs])

    @torch.no_grad()
    def targets(self, views_vchw: Tensor, mask_vn: Tensor, full_view: bool = False,
                amp: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """What the cache stores for a batch of uint8 views: ``(tokens_vnc, valid_vn, pooled_vc)``.

        Normalises with the teacher's ``mean``/``std``, runs :meth:`forward_masked` (on the
        full view when ``full_view``, i.e. ``teacher_view=full``) under optional autocast
        ``amp``; ``pooled`` is the L2-normalised mean of the valid tokens (H-GKD Sec. 3.2.2's
        p_t). Extraction and ``hgkd-distill --online-teacher`` both call it, so both give the
        same targets.
        """
        device = next(self.parameters()).device
        mean, std = pixel_stats(self.mean, self.std, device)
        x = normalize_uint8(views_vchw.to(device, non_blocking=True), mean, std)
        mask = None if full_view else mask_vn.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            tokens, valid = self.forward_masked(x, mask)
        tokens = tokens.float()
        weights = valid.unsqueeze(-1).float()
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return tokens, valid, torch.nn.functional.normalize(pooled, dim=-1)

    def _forward_masked(
        self, images_bchw: Tensor, mask_bn: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Family-specific forward; may assume equal visible counts when ``visible_only``."""
        raise NotImplementedError

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        """Map an official checkpoint's keys onto this module (the family's filter fn)."""
        return state_dict

    def _check_inputs(self, images_bchw: Tensor, mask_bn: Tensor | None) -> None:
        expected = (3, self.img_size, self.img_size)
        if images_bchw.ndim != 4 or tuple(images_bchw.shape[1:]) != expected:
            raise ValueError(f"{self.teacher_name or self.family} teacher expects images of "
                             f"shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(images_bchw.shape)}")
        if mask_bn is None:
            return
        expected_mask = (images_bchw.shape[0], self.num_patches)
        if mask_bn.dtype != torch.bool or tuple(mask_bn.shape) != expected_mask:
            raise ValueError(f"mask_bn must be bool of shape ({images_bchw.shape[0]}, "
                             f"{self.num_patches}), got {mask_bn.dtype} {tuple(mask_bn.shape)}")


TEACHERS = Registry[Teacher]("teacher")
register_teacher: Callable[[Callable[..., Teacher]], Callable[..., Teacher]] = TEACHERS.register


def list_teachers() -> list[str]:
    """Names of all registered teachers, sorted."""
    return TEACHERS.names()


def create_teacher(
    name: str, checkpoint: str | os.PathLike | None = None, **kwargs: Any
) -> Teacher:
    """Build the registered teacher ``name``, load ``checkpoint`` if given, and freeze it.

    ``kwargs`` override the factory's defaults (e.g. ``img_size``). Without a checkpoint the
    weights are random (tests, demos). The returned module is in eval mode with
    ``requires_grad`` False on every parameter.
    """
    model = TEACHERS.create(name, **kwargs)
    model.teacher_name = name
    if checkpoint is not None:
        load_teacher_checkpoint(model, checkpoint)
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher_checkpoint(model: Teacher, path: str | os.PathLike) -> None:
    """Load an official checkpoint file into ``model`` through its family's filter, strictly."""
    state = model.filter_state_dict(load_checkpoint_file(path))
    problems = _state_dict_mismatch(model, state)
    if problems:
        name = model.teacher_name or type(model).__name__
        raise HgkdError(f"checkpoint {path} does not fit teacher {name!r}: {problems}; "
                        f"choose the teacher (family and size) the file was trained as")
    model.load_state_dict(state, strict=True)
    model.checkpoint_path = str(path)


def _state_dict_mismatch(model: nn.Module, state: StateDict, show: int = 4) -> str:
    """One-line summary of missing/unexpected keys and shape mismatches ('' if none)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches (checkpoint vs teacher)", shapes)):
        if items:
            more = f" (+{len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)


def load_checkpoint_file(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file and return its flat state dict (name -> tensor).

    ``.safetensors`` is read with safetensors; ``.pth``/``.pt``/``.bin`` with
    ``torch.load(weights_only=True)``, allow-listing only :data:`CHECKPOINT_SAFE_GLOBALS`.
    Never falls back to full unpickling. Official containers (``model``, ``module``,
    ``state_dict``, ``model_ema``) and a DDP ``module.`` prefix are unwrapped.
    Any problem with the file raises :class:`HgkdError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise HgkdError(f"checkpoint {path} does not exist or is not a file; "
                        f"pass the path of the downloaded release file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _load_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        obj = _load_torch_weights_only(path)
    else:
        raise HgkdError(f"checkpoint {path} has an unsupported suffix {suffix!r}; "
                        f"use .safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    return _unwrap_state_dict(obj, path)


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise HgkdError(f"checkpoint {path} is not a valid safetensors file ({exc}); "
                        f"re-download or convert it") from None


def _load_torch_weights_only(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        if blocked:
            raise HgkdError(f"refused to unpickle {path}: it needs {blocked.group(1)}, which is "
                            f"not on the allow-list of safe types (unpickling it could run "
                            f"code); only weights-only checkpoints are accepted") from None
        raise HgkdError(f"checkpoint {path} is not a weights-only PyTorch checkpoint "
                        f"({_unpickling_detail(exc)}); re-download the official release "
                        f"file") from None
    except Exception as exc:  # garbage input fails anywhere inside the unpickler
        raise HgkdError(f"checkpoint {path} could not be read as a PyTorch checkpoint "
                        f"({type(exc).__name__}: {_unpickling_detail(exc)}); "
                        f"re-download the official release file") from None


def _unpickling_detail(exc: Exception) -> str:
    """The informative line of torch's multi-paragraph weights-only error."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines()
             if ln.strip() and not ln.strip().startswith(boilerplate)]
    return lines[0] if lines else "unreadable"


def _unwrap_state_dict(obj: Any, path: Path) -> StateDict:
    """Descend through official container keys to the flat tensor dict."""
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            keys = ", ".join(map(str, list(obj)[:6]))
            raise HgkdError(f"checkpoint {path} holds no weights under any of "
                            f"{', '.join(CONTAINER_KEYS)} (top-level keys: {keys}); "
                            f"pass an official pre-training release file")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise HgkdError(f"checkpoint {path} does not contain a state dict "
                        f"(found {type(obj).__name__}); pass an official release file")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are ~1.2 GB); for cache metadata."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
