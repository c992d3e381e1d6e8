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
"""
from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from ..devices import join_process_group
from ..errors import HgkdError
from .data import MIN_SCALE, LabelledSet, labelled_few
from .probe import ProbeHead, batches, class_index, cosine_schedule, model_device, seeded, topk_accuracy

log = logging.getLogger(__name__)


def finetune(model: nn.Module, train: LabelledSet, test: LabelledSet, epochs: int = 10, lr: float = 5e-4,
             weight_decay: float = 0.05, batch_size: int = 64, hidden: int | None = None, seed: int = 0,
             workers: int = 0, min_scale: float = MIN_SCALE, labels_per_class: int | None = None) -> dict:
    """Fine-tune a copy of ``model`` (on its device) with an MLP head; test top-1/top-5 in percent.
    ``labels_per_class``: train on that many labelled images of each class only (``labelled_few``,
    drawn with ``seed``): the semi-supervised protocol, where a pre-trained trunk matters most."""
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
    with seeded(seed):
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
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            loss, train_top1 = train_epoch(trained, loader, classes, optimizer, schedule,
                                           global_batch=min(batch_size, len(dataset)))
            log.info("finetune epoch %d/%d: loss %.4f, train top-1 %.1f%%", epoch + 1, epochs, loss, train_top1)
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
                   **({"ranks": world, "sync_batchnorm": device.type == "cuda"} if world > 1 else {})}]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return {**result[0], "seconds": time.perf_counter() - start}


class GlobalBatchSlices(Sampler[list[int]]):
    """The batches ``BatchSampler(order, batch_size, drop_last)`` makes, each cut into ``world``
    contiguous slices (sizes differ by at most one); this rank gets slice ``rank``."""

    def __init__(self, order: Sampler[int], batch_size: int, drop_last: bool, rank: int = 0, world: int = 1) -> None:
        self.batches, self.rank, self.world = BatchSampler(order, batch_size, drop_last), rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
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
                schedule: torch.optim.lr_scheduler.LRScheduler, global_batch: int | None = None) -> tuple[float, float]:
    """One pass of cross-entropy training; returns the last batch's loss and the epoch's train top-1 (%).

    Under DDP (``global_batch``: the batch summed over ranks) each rank's mean loss is weighted by
    its share of the batch, so the averaged gradient is the whole batch's; the returned loss and
    top-1 are the whole batch's and the whole epoch's."""
    device = model_device(net)
    world = dist.get_world_size() if dist.is_initialized() else 1
    net.train()
    correct = seen = 0
    for x_bchw, y in loader:
        target = torch.searchsorted(classes, y).to(device)
        logits = net(x_bchw.to(device))
        loss = F.cross_entropy(logits, target)
        share = len(target) * world / (global_batch or len(target))
        optimizer.zero_grad(set_to_none=True)
        (loss if share == 1 else loss * share).backward()
        optimizer.step()
        schedule.step()
        correct += (logits.argmax(1) == target).sum().item()
        seen += len(target)
    if world == 1:
        return loss.item(), 100.0 * correct / max(seen, 1)
    totals = torch.tensor([loss.item() * len(target), len(target), correct, seen], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item(), 100.0 * (totals[2] / totals[3].clamp(min=1)).item()
