"""Full fine-tuning: backbone + the probe's MLP head, trained end to end on augmented images.

The head is H-GKD's (average pool -> Linear -> ReLU -> Linear; the pool is the backbone's own
global pool), without the probe's feature standardisation since the backbone moves. AdamW (no
decay on biases and norm weights), one warm-up epoch (when there are several) then a per-step
cosine; RandomResizedCrop (scale ``min_scale``-1) + flip drawn from ``(seed, key, epoch)``
(``hgkd.evaluate.data``). ``min_scale`` 0.08 is the ImageNet recipe. On small low-resolution
sets pick it from the images: the demo's digits (8x8 scans upsampled to 64 px) lose the digit
in crops under ~0.8 of the image (the frozen probe's features classify min_scale-0.35 crops at
35%, centre crops at 89%), and fine-tuning the demo's H-GKD student for 3 epochs at the
default scored 54.6% against 97.6% for 10 epochs at 0.8 (issue 12; LP-FT head warm-up and
layer-wise lr decay 0.75 on top gave 95.8%, so they are not used). The images are streamed
every epoch: DataLoader workers read, decode, resize and augment each batch (nothing decoded
is kept between batches). The model passed in is copied, never modified. The accuracy is the
last epoch's.

Under torchrun (``process_group``: gloo on CPU, nccl on CUDA) every rank walks the same shuffled
order and takes its contiguous slice of each global batch of ``batch_size`` (``GlobalBatchSlices``),
DistributedDataParallel averages the gradients, and the logged loss and train top-1 are reduced
over the ranks, so the steps are those of one process with the same batch. BatchNorm is
SyncBatchNorm on CUDA only: torch's SyncBatchNorm refuses CPU tensors (its kernels,
``torch.batch_norm_stats`` and friends, are CUDA-only), so on CPU each rank normalises its own
slice and the run is close to, not equal to, the single-process one. Rank 0 tests the model and
sends the record to the others.

Preemption (issue 21): with ``checkpoint_dir``, SIGTERM/SIGUSR1 (``hgkd.preemption``; every rank
agrees on the step) stop training after the current step; ``finetune.pt`` there then holds the
model, optimizer, schedule, position (epoch, step, the epoch's running counts), the sampler's
generator as of the epoch's start and every rank's torch RNG, with the run's config, and
``Resumable`` is raised. ``resume`` continues from it (the epoch's order is re-drawn and its
first ``step`` batches skipped in the sampler, no image read), so the run ends bit-equal to an
uninterrupted one on CPU; the checkpoint is removed when the run completes. It is written only
on a stop: a run killed without warning starts over.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from ..devices import join_process_group
from ..errors import HgkdError, Resumable
from ..preemption import StopSignals, stop_signals
from .data import MIN_SCALE, LabelledSet, labelled_few
from .detection_checkpoint import CheckpointFile
from .probe import ProbeHead, batches, class_index, cosine_schedule, model_device, seeded, topk_accuracy

log = logging.getLogger(__name__)


CHECKPOINT = "finetune.pt"


@dataclass
class Position:
    """Where training is: steps done in ``epoch`` and that epoch's running loss and top-1 counts."""

    epoch: int = 0
    step: int = 0
    loss: float = float("nan")
    correct: int = 0
    seen: int = 0


def finetune(model: nn.Module, train: LabelledSet, test: LabelledSet, epochs: int = 10, lr: float = 5e-4,
             weight_decay: float = 0.05, batch_size: int = 64, hidden: int | None = None, seed: int = 0,
             workers: int = 0, min_scale: float = MIN_SCALE, labels_per_class: int | None = None,
             checkpoint_dir: str | None = None, resume: bool = False) -> dict:
    """Fine-tune a copy of ``model`` (on its device) with an MLP head; test top-1/top-5 in percent.
    ``labels_per_class``: train on that many labelled images of each class only (``labelled_few``,
    drawn with ``seed``): the semi-supervised protocol, where a pre-trained trunk matters most.
    ``checkpoint_dir``: where a stop signal leaves ``finetune.pt`` (``resume``: continue it)."""
    if labels_per_class is not None:
        train = labelled_few(train, labels_per_class, seed)
    train_i, test_i, classes = class_index(train.labels, test.labels)
    if len(classes) < 2 or epochs < 1 or batch_size < 2:
        raise HgkdError(f"fine-tuning needs 2+ training classes (got {len(classes)}), epochs >= 1, batch size >= 2")
    device, start = model_device(model), time.perf_counter()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world or len(train) < 2 * world:
        raise HgkdError(f"fine-tuning on {world} ranks needs --batch-size divisible by {world} (got {batch_size}) "
                        f"and {2 * world}+ training images (got {len(train)})")
    dataset = train.dataset(train=True, seed=seed, min_scale=min_scale)
    generator = torch.Generator().manual_seed(seed)  # one process: exactly DataLoader(shuffle=True, generator)
    slices = GlobalBatchSlices(RandomSampler(dataset, generator=generator), batch_size,
                               drop_last=len(dataset) > batch_size,  # no 1-sample batch for BatchNorm
                               rank=rank, world=world)
    loader = DataLoader(dataset, batch_sampler=slices, num_workers=workers, generator=generator)
    ckpt = CheckpointFile(Path(checkpoint_dir) / CHECKPOINT) if checkpoint_dir else None
    if resume and ckpt is None:
        raise HgkdError("--resume needs checkpoints: give --out or --checkpoint-dir")
    config = {"model": _fingerprint(model), "train": train.name, "train_keys": _fingerprint(train.keys),
              "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "hidden": hidden,
              "seed": seed, "min_scale": min_scale, "labels_per_class": labels_per_class, "ranks": world}
    with seeded(seed), (stop_signals() if ckpt else nullcontext()) as stop:
        backbone = copy.deepcopy(model).train()
        net = nn.Sequential(backbone, ProbeHead(backbone.num_features, len(classes), "mlp", hidden,
                                                standardize=False)).to(device)
        if world > 1 and device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # no weight decay on biases and norm parameters (timm's grouping)
        optimizer = torch.optim.AdamW(param_groups_weight_decay(net, weight_decay), lr=lr)
        schedule = cosine_schedule(optimizer, epochs * len(loader), warmup_steps=len(loader) if epochs > 1 else 0)
        trained = net if world == 1 else DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        state = ckpt.load(config, resume, rank) if ckpt else None
        at = _restore(state, net, optimizer, schedule, rank, device) if state else Position()
        while at.epoch < epochs:
            dataset.set_epoch(at.epoch)
            epoch_start = generator.get_state()  # the epoch's order and loader seed are drawn from here
            if state is not None:  # resumed mid-epoch: the epoch's draws again, its first batches skipped
                generator.set_state(state["generator"])
                epoch_start, state = state["generator"], None
            slices.skip = at.step
            stopped = train_epoch(trained, loader, classes, optimizer, schedule,
                                  global_batch=min(batch_size, len(dataset)), at=at,
                                  stop=lambda: stop_agreed(stop, world, device))
            if stopped:
                _save_and_stop(ckpt, stopped, at, epochs * len(loader), len(loader), resume, net, optimizer,
                               schedule, epoch_start, config, rank, world, device)
            loss, train_top1 = at.loss, 100.0 * at.correct / max(at.seen, 1)
            log.info("finetune epoch %d/%d: loss %.4f, train top-1 %.1f%%", at.epoch + 1, epochs, loss, train_top1)
            at = Position(epoch=at.epoch + 1)
    if not math.isfinite(loss):
        raise HgkdError(f"fine-tuning diverged (loss {loss}); lower --lr")
    result = [None]
    if rank == 0:
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(x.to(device)).float().cpu() for x in batches(test, batch_size, workers)])
        result = [{**topk_accuracy(logits, test_i), "train_top1": train_top1, "final_loss": loss,
                   "n_classes": len(classes), "n_train": len(train), "n_test": len(test), "epochs": epochs,
                   "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                   "hidden": hidden or backbone.num_features, "min_scale": min_scale, "optimizer": "adamw",
                   "labels_per_class": labels_per_class, "n_labelled": len(train),
                   "weights_sha256": _fingerprint(net),  # bit-equal runs (a resumed one too) have equal weights
                   **({"ranks": world, "sync_batchnorm": device.type == "cuda"} if world > 1 else {})}]
        if ckpt is not None:  # consumed once the result exists: a stop while testing still resumes from it
            ckpt.path.unlink(missing_ok=True)
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return {**result[0], "seconds": time.perf_counter() - start}


def _fingerprint(thing: nn.Module | list[str]) -> str:
    """sha256 of a model's weights or of a list of sample keys: what a checkpoint must be resumed on."""
    if isinstance(thing, nn.Module):
        from .features import model_fingerprint

        return model_fingerprint(thing)
    return hashlib.sha256("\n".join(thing).encode()).hexdigest()


def _restore(state: dict[str, Any], net: nn.Module, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler, rank: int, device: torch.device) -> Position:
    """Load a stop checkpoint into the freshly built run; returns where it stopped."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"][rank]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
    at = Position(**state["position"])
    log.info("resumed fine-tuning at epoch %d, step %d", at.epoch + 1, at.step)
    return at


def _save_and_stop(ckpt: CheckpointFile, signal_name: str, at: Position, total_steps: int, steps_per_epoch: int,
                   resumed: bool, net: nn.Module, optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler, epoch_start: Tensor, config: dict[str, Any],
                   rank: int, world: int, device: torch.device) -> None:
    """Write the stop checkpoint (rank 0; every rank's RNG gathered) and raise ``Resumable``."""
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    if rank == 0:
        ckpt.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                   "position": asdict(at), "generator": epoch_start, "rng": rngs, "config": config})
    if world > 1:  # no rank exits before the checkpoint is written: torchrun would kill rank 0 mid-write
        dist.barrier()
    again = "again" if resumed else "with --resume"
    raise Resumable(f"{ckpt.path}: {signal_name} at step {at.epoch * steps_per_epoch + at.step} of {total_steps} "
                    f"(epoch {at.epoch + 1}); resumable: run the same command {again}")


def stop_agreed(stop: StopSignals | None, world: int, device: torch.device) -> str | None:
    """The stop signal's name once any rank got one (all ranks agree, at the same step), else None."""
    if stop is None:
        return None
    if world == 1:
        return stop.requested
    flag = torch.tensor([stop.requested is not None], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (stop.requested or "SIGTERM") if flag.item() else None


class GlobalBatchSlices(Sampler[list[int]]):
    """The batches ``BatchSampler(order, batch_size, drop_last)`` makes, each cut into ``world``
    contiguous slices (sizes differ by at most one); this rank gets slice ``rank``. The first
    ``skip`` batches of the next pass are drawn but not yielded (a resumed epoch)."""

    def __init__(self, order: Sampler[int], batch_size: int, drop_last: bool, rank: int = 0, world: int = 1) -> None:
        self.batches, self.rank, self.world = BatchSampler(order, batch_size, drop_last), rank, world
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batches):
            if i >= self.skip:
                yield batch[len(batch) * self.rank // self.world:len(batch) * (self.rank + 1) // self.world]

    def __len__(self) -> int:
        return len(self.batches)


@contextmanager
def process_group(device: torch.device) -> Iterator[int]:
    """Join torchrun's process group for the block when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)
    and leave it afterwards; yields this process's rank (0 without torchrun)."""
    joined = join_process_group(device)
    try:
        yield dist.get_rank() if dist.is_initialized() else 0
    finally:
        if joined:
            dist.destroy_process_group()


def train_epoch(net: nn.Module, loader: DataLoader, classes: Tensor, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler, global_batch: int | None = None,
                at: Position | None = None, stop: Callable[[], str | None] = lambda: None) -> str | None:
    """One pass of cross-entropy training, kept in ``at``: the last batch's loss, the epoch's top-1
    counts and the steps done. ``stop`` is asked after each step; its answer (a signal name) ends
    the pass early and is returned (None: the pass is complete).

    Under DDP (``global_batch``: the batch summed over ranks) each rank's mean loss is weighted by
    its share of the batch, so the averaged gradient is the whole batch's; the loss and top-1
    counts in ``at`` are the whole batch's and the whole epoch's."""
    device = model_device(net)
    world = dist.get_world_size() if dist.is_initialized() else 1
    at = Position() if at is None else at
    net.train()
    for x_bchw, y in loader:
        target = torch.searchsorted(classes, y).to(device)
        logits = net(x_bchw.to(device))
        loss = F.cross_entropy(logits, target)
        share = len(target) * world / (global_batch or len(target))
        optimizer.zero_grad(set_to_none=True)
        (loss if share == 1 else loss * share).backward()
        optimizer.step()
        schedule.step()
        counts = torch.tensor([loss.item() * len(target), len(target), (logits.argmax(1) == target).sum().item()],
                              dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts)
        at.loss, at.step = (counts[0] / counts[1]).item(), at.step + 1
        at.correct, at.seen = at.correct + int(counts[2].item()), at.seen + int(counts[1].item())
        if signal_name := stop():
            return signal_name
    return None
