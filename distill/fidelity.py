"""How closely a trained student reproduces the teacher: token cosine and relative MSE.

Measured on a cache of held-out views (e.g. extracted from a validation split with the same
teacher and view settings), over valid teacher tokens, student in eval mode.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HgkdError
from ..pixels import normalize_uint8, pixel_stats
from ..storage.cache import FeatureCache
from ..storage.metadata import teacher_identity
from ..run_layout import final_checkpoint
from .checkpoint import load_checkpoint
from .config import DistillConfig
from .data import CacheViewDataset
from .train import build_student


def check_same_teacher(run_dir: Path, ckpt: dict, cfg: DistillConfig, cache: FeatureCache, cache_url: str) -> None:
    """Refuse a cache of another teacher (name, weights or grid) than the run learnt from.

    Runs checkpointed before the identity was stored (issue 11) are compared with their
    training cache when it is still there.
    """
    trained = ckpt.get("teacher")
    if trained is None and cfg.cache and FeatureCache.exists(cfg.cache):
        trained = teacher_identity(FeatureCache.open(cfg.cache).meta.teacher)
    if trained is None:
        return
    held_out = teacher_identity(cache.meta.teacher)
    diff = [f"{key} {held_out[key]!r} != {trained[key]!r}" for key in held_out if held_out[key] != trained.get(key)]
    if diff:
        raise HgkdError(f"--cache {cache_url}: made by another teacher than {run_dir} was trained on "
                        f"({'; '.join(diff)}); extract the held-out cache with the run's teacher and checkpoint")


@torch.no_grad()
def fidelity(run_dir: Path, cache_url: str, data: list[str], batch_size: int = 64,
             max_views: int | None = None) -> dict[str, float]:
    """Mean token cosine and relative MSE (sum (s-t)^2 / sum t^2) of the run's student."""
    ckpt = load_checkpoint(final_checkpoint(run_dir))
    cfg = DistillConfig.from_dict(ckpt["config"], source=str(run_dir))
    check_same_teacher(run_dir, ckpt, cfg, FeatureCache.open(cache_url), cache_url)
    dataset = CacheViewDataset(cache_url, data)
    meta = dataset.cache.meta.teacher
    model = build_student(cfg, int(meta["embed_dim"]), int(meta["patch_size"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise HgkdError(f"--cache {cache_url}: its teacher ({meta['name']}, dim {meta['embed_dim']}) is not the one "
                        f"{run_dir} was trained on") from None
    model.eval()
    mean, std = pixel_stats()
    rows = dataset.ok_rows[:max_views]
    cos_sum, n_tokens, err_sum, ref_sum = 0.0, 0, 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        batch = dataset[rows[start : start + batch_size].tolist()].ready()
        out = model(normalize_uint8(batch.images, mean, std), batch.visible).float()
        valid = batch.valid
        cos_sum += torch.nn.functional.cosine_similarity(out[valid], batch.tokens[valid], dim=-1).sum().item()
        n_tokens += int(valid.sum())
        err_sum += (out[valid] - batch.tokens[valid]).pow(2).sum().item()
        ref_sum += batch.tokens[valid].pow(2).sum().item()
    return {"token_cosine": cos_sum / max(n_tokens, 1), "relative_mse": err_sum / max(ref_sum, 1e-12),
            "views": len(rows), "tokens": n_tokens}
