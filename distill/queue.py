"""FIFO memory queue of pooled teacher embeddings (H-GKD Sec. 3.2.2, Fig. 4).

Lives on the training device. ``push`` enqueues first, then the caller compares against
the queue (the paper's order: the current batch is part of the queue it is compared with).
Wrap-around indexing, any batch size. Under DDP every rank gathers the teacher embeddings
of all ranks before pushing, so all ranks hold the same queue.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class MemoryQueue(nn.Module):
    """Ring buffer of L2-normalised embeddings (length x dim); ``filled`` rows are valid.

    Rows are normalised once on entry, so the loss never re-normalises 50k rows per step.
    """

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.length = length
        self.register_buffer("embeddings_ld", torch.zeros(length, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, embeddings_bd: Tensor, gather: bool = True) -> None:
        """Enqueue a batch (oldest entries are overwritten); gathers across DDP ranks."""
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(embeddings_bd) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, embeddings_bd.contiguous())
            embeddings_bd = torch.cat(parts)
        embeddings_bd = F.normalize(embeddings_bd.detach().to(self.embeddings_ld.dtype)[-self.length :], dim=-1)
        n = embeddings_bd.shape[0]
        rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.length
        self.embeddings_ld[rows] = embeddings_bd
        self.ptr.copy_((self.ptr + n) % self.length)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.length))

    def contents(self) -> Tensor:
        """The valid rows (all of them once the queue has wrapped)."""
        return self.embeddings_ld[: int(self.filled)]
