"""Stage two: train the sparse UNet student against cached teacher targets (H-GKD Sec. 3.2).

One step: enqueue the batch's teacher embeddings, run the student on the teacher's exact
masked view, L = L_mse + lambda * L_sim, LAMB with grad-norm clipping, per-step cosine
schedule with warm-up (timm). Runs single-process or under torchrun (DDP; gloo on CPU).
"""
from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..errors import HgkdError
from .checkpoint import LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import DistillConfig
from .data import Batch, ChunkAwareBatchSampler
from .losses import masked_mse, pooled_embedding, similarity_loss
from .queue import MemoryQueue
from .students import create_encoder
from .students.model import HgkdStudent
from .targets import make_targets

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HgkdError(f"--device {name}: CUDA is not available; use --device cpu")
    return torch.device(name)


def build_student(cfg: DistillConfig, embed_dim: int, patch_size: int) -> HgkdStudent:
    """Student whose output matches the teacher's token grid and width."""
    encoder = create_encoder(cfg.student, backend=cfg.encoder_backend)
    return HgkdStudent(encoder, out_dim=embed_dim, patch_size=patch_size, decoder_width=cfg.decoder_width,
                       unet=cfg.unet)


class Trainer:
    """Owns model, optimizer, schedule, queue and position; ``fit`` runs to cfg.epochs."""

    def __init__(self, cfg: DistillConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        torch.manual_seed(cfg.seed)
        self.targets = make_targets(cfg, self.device)
        self.dataset = self.targets.dataset
        if cfg.batch_size % self.dist.world_size:
            raise HgkdError(f"--batch-size {cfg.batch_size} must be divisible by the {self.dist.world_size} ranks")
        self.sampler = ChunkAwareBatchSampler(self.dataset.ok_rows, self.targets.shard_views,
                                              cfg.batch_size // self.dist.world_size, cfg.seed,
                                              rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        self.model = build_student(cfg, self.targets.embed_dim, self.targets.patch_size).to(self.device)
        self.optimizer = create_optimizer_v2(self.model, "lamb", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             betas=(0.9, 0.999))
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=total, lr_min=1e-6, warmup_lr_init=1e-6,
                                           warmup_t=cfg.warmup_epochs * self.steps_per_epoch, t_in_epochs=False)
        self.queue = MemoryQueue(cfg.queue_size, self.targets.embed_dim).to(self.device)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.dist.world_size > 1 else self.model)
        self.amp = torch.bfloat16 if (cfg.amp and self.device.type == "cuda") else None
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch, self.next_batch, self.global_step = 0, 0, 0
        self._loader: DataLoader | None = None
        if resume:
            self._restore(load_checkpoint(self.run_dir / "checkpoints" / LAST))
        elif (self.run_dir / "checkpoints" / LAST).exists():
            raise HgkdError(f"--out {self.run_dir} already holds a run; continue it with --resume or use a new --out")
        else:
            self._prefill_queue()
        self.scheduler.step_update(self.global_step)

    # ---- state -------------------------------------------------------------------------
    def _prefill_queue(self) -> None:
        """Fill the queue from the cache's pooled embeddings before step one (method notes)."""
        if not (self.cfg.similarity and self.cfg.prefill_queue):
            return
        pooled = self.targets.prefill(min(self.cfg.queue_size, len(self.dataset.ok_rows)), self.cfg.seed)
        if pooled is not None:
            self.queue.push(pooled.to(self.device), gather=False)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "queue": self.queue.state_dict(), "rng": rng_state(), "epoch": self.epoch,
                "next_batch": self.next_batch, "global_step": self.global_step, "config": self.cfg.to_dict(),
                "targets_fingerprint": self.targets.fingerprint}

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("targets_fingerprint") != self.targets.fingerprint:
            raise HgkdError(f"--resume: {self.run_dir} was trained on other teacher targets (cache, teacher or "
                            f"data differ); resume with the original --cache/--online-teacher and --data")
        saved = DistillConfig.from_dict(ckpt["config"])
        for key in ("student", "sparse", "unet", "similarity", "decoder_width", "queue_size", "batch_size", "seed"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise HgkdError(f"--resume: option {key} was {getattr(saved, key)!r} in {self.run_dir}, "
                                f"now {getattr(self.cfg, key)!r}; resume with the original options")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.queue.load_state_dict(ckpt["queue"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.next_batch, self.global_step = ckpt["epoch"], ckpt["next_batch"], ckpt["global_step"]

    def save(self) -> None:
        if self.dist.main:
            save_checkpoint(self.run_dir, self.state())

    # ---- one step ----------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """L = L_mse + lambda * L_sim on one batch (queue updated first, as in the paper)."""
        x = (batch.images.float() - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out_bnc = self.ddp(x, batch.visible)
        out_bnc = out_bnc.float()
        terms = {"mse": masked_mse(out_bnc, batch.tokens, batch.valid)}
        if self.cfg.similarity:
            self.queue.push(batch.pooled)
            terms["sim"] = similarity_loss(batch.pooled, pooled_embedding(out_bnc, batch.valid),
                                           self.queue.contents(), self.cfg.tau)
        terms["loss"] = terms["mse"] + self.cfg.sim_weight * terms.get("sim", torch.zeros((), device=self.device))
        return terms

    def step(self, batch: Batch) -> dict[str, float]:
        self.ddp.train()
        terms = self.losses(self.targets.complete(batch.to(self.device)))
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        return {**{k: float(v.detach()) for k, v in terms.items()}, "grad_norm": float(grad_norm),
                "lr": self.optimizer.param_groups[0]["lr"]}

    # ---- loop --------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        """One loader for the whole run: workers persist across epochs (the batch sampler
        runs in this process, so ``set_epoch`` still takes effect)."""
        if self._loader is None:
            self._loader = DataLoader(self.dataset, sampler=self.sampler, batch_size=None,
                                      num_workers=self.cfg.workers, collate_fn=_as_is,
                                      pin_memory=self.device.type == "cuda",
                                      persistent_workers=self.cfg.workers > 0)
        return self._loader

    def fit(self, stop_after_steps: int | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.epochs`` (or for ``stop_after_steps`` steps); returns per-step metrics."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            self.cfg.save(self.run_dir / "config.yaml")
        metrics = MetricsLog(self.run_dir, enabled=self.dist.main)
        history: list[dict[str, float]] = []
        steps_done = 0
        while self.epoch < self.cfg.epochs:
            self.sampler.set_epoch(self.epoch, self.next_batch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.next_batch, desc=f"epoch {self.epoch}",
                       disable=not self.dist.main or not self.cfg.log_every, leave=False)
            tick = time.perf_counter()
            for batch in self.loader():
                row = self.step(batch)
                self.next_batch += 1
                row.update(epoch=self.epoch, step=self.global_step,
                           img_per_s=len(batch.rows) * self.dist.world_size / (time.perf_counter() - tick))
                tick = time.perf_counter()
                history.append(row)
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")
                bar.update(1)
                steps_done += 1
                if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                    self.save()
                if stop_after_steps is not None and steps_done >= stop_after_steps:
                    bar.close()
                    metrics.close()
                    return history
            bar.close()
            self.epoch, self.next_batch = self.epoch + 1, 0
            self.save()
        metrics.close()
        return history


def _as_is(batch: Batch) -> Batch:
    return batch  # the dataset already returns whole batches


class MetricsLog:
    """Per-step metrics to ``metrics.csv`` and, when installed, TensorBoard."""

    FIELDS = ("epoch", "step", "loss", "mse", "sim", "lr", "grad_norm", "img_per_s")

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        path = run_dir / "metrics.csv"
        new = not path.exists()
        self._file = path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.FIELDS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self._tb = None

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key in ("loss", "mse", "sim", "lr", "grad_norm", "img_per_s"):
                if key in row:
                    self._tb.add_scalar(f"train/{key}", row[key], int(row["step"]))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
