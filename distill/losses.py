"""H-GKD objective (Sec. 3.2.2): masked feature MSE + Pearson similarity-distribution loss.

With teacher tokens ``t``, student output ``s`` and the memory queue ``Q`` of pooled,
L2-normalised teacher embeddings:
  p_t = softmax(cos(t_pool, Q) / tau),  p_s = softmax(cos(s_pool, Q) / tau)
  L_sim = 1 - pearson(p_t, p_s)   (over the queue dimension, mean over the batch)
  L_mse = mean((s - t)^2) over valid tokens
  L = L_mse + lambda * L_sim
(paper defaults: tau = 0.009, queue 50,000; lambda = 1 is the notes' choice).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mse(student_bnc: Tensor, teacher_bnc: Tensor, valid_bn: Tensor) -> Tensor:
    """L_mse: mean squared error over the channels of valid tokens only (MAE: visible ones)."""
    weights = valid_bn.unsqueeze(-1).to(student_bnc.dtype)
    sq = (student_bnc - teacher_bnc).pow(2) * weights
    return sq.sum() / (weights.sum() * student_bnc.shape[-1]).clamp_min(1.0)


def pooled_embedding(tokens_bnc: Tensor, valid_bn: Tensor) -> Tensor:
    """Mean of valid tokens, L2-normalised: the embedding compared against the queue."""
    weights = valid_bn.unsqueeze(-1).to(tokens_bnc.dtype)
    pooled = (tokens_bnc * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def pearson(x_bl: Tensor, y_bl: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row pair over the last dimension: (B,)."""
    xc = x_bl - x_bl.mean(-1, keepdim=True)
    yc = y_bl - y_bl.mean(-1, keepdim=True)
    return (xc * yc).sum(-1) / (xc.norm(dim=-1) * yc.norm(dim=-1)).clamp_min(eps)


def similarity_loss(teacher_pool_bd: Tensor, student_pool_bd: Tensor, queue_ld: Tensor, tau: float) -> Tensor:
    """L_sim = 1 - pearson(p_t, p_s) with p = softmax(cos(x, Q) / tau) over the queue.

    ``queue_ld`` rows must be L2-normalised (``MemoryQueue`` stores them so); the teacher
    side carries no gradient.
    """
    queue = queue_ld.to(student_pool_bd.dtype)
    with torch.no_grad():
        p_t = F.softmax(F.normalize(teacher_pool_bd, dim=-1) @ queue.T / tau, dim=-1)
    p_s = F.softmax(F.normalize(student_pool_bd, dim=-1) @ queue.T / tau, dim=-1)
    return (1.0 - pearson(p_t, p_s)).mean()
