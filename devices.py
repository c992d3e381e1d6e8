"""Device choice for every stage: ``--device auto|cpu|cuda|cuda:N`` -> ``torch.device``."""
from __future__ import annotations

import logging
import os

import torch

from .errors import HgkdError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto", *, per_rank: bool = False) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a CUDA device on a machine without one is a user error.

    ``per_rank``: ``auto`` picks ``cuda:$LOCAL_RANK`` (torchrun; 0 when unset) instead of plain ``cuda``.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if per_rank else torch.device("cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HgkdError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise HgkdError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None


def join_process_group(device: torch.device) -> bool:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` and none is joined yet (nccl on
    CUDA, with ``device`` made current; gloo on CPU). Returns whether this call joined it, so
    the caller that joined is the one that leaves (``torch.distributed.destroy_process_group``)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    warn_shared_store_restarts()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def warn_shared_store_restarts() -> None:
    """One warning (rank 0) when torchrun may restart the ranks (``--max-restarts`` > 0) while they
    share its rendezvous store: a restarted rank can then read the previous attempt's addresses
    and fail to connect (pytorch/pytorch#135712)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if restarts > 0 and shared and os.environ.get("RANK", "0") == "0":
        log.warning("torchrun --max-restarts %d with its shared rendezvous store: a restart can fail to connect "
                    "(pytorch#135712); run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", restarts)
