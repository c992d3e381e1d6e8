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
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..errors import HgkdError
from .data import MIN_SCALE, LabelledSet
from .probe import ProbeHead, batches, class_index, cosine_schedule, model_device, seeded, topk_accuracy

log = logging.getLogger(__name__)


def finetune(model: nn.Module, train: LabelledSet, test: LabelledSet, epochs: int = 10, lr: float = 5e-4,
             weight_decay: float = 0.05, batch_size: int = 64, hidden: int | None = None, seed: int = 0,
             workers: int = 0, min_scale: float = MIN_SCALE) -> dict:
    """Fine-tune a copy of ``model`` (on its device) with an MLP head; test top-1/top-5 in percent."""
    train_i, test_i, classes = class_index(train.labels, test.labels)
    if len(classes) < 2 or epochs < 1 or batch_size < 2:
        raise HgkdError(f"fine-tuning needs 2+ training classes (got {len(classes)}), epochs >= 1, batch size >= 2")
    device, start = model_device(model), time.perf_counter()
    dataset = train.dataset(train=True, seed=seed, min_scale=min_scale)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=len(dataset) > batch_size,  # no 1-sample batch for BatchNorm
                        generator=torch.Generator().manual_seed(seed))
    with seeded(seed):
        backbone = copy.deepcopy(model).train()
        net = nn.Sequential(backbone, ProbeHead(backbone.num_features, len(classes), "mlp", hidden,
                                                standardize=False)).to(device)
        # no weight decay on biases and norm parameters (timm's grouping)
        optimizer = torch.optim.AdamW(param_groups_weight_decay(net, weight_decay), lr=lr)
        schedule = cosine_schedule(optimizer, epochs * len(loader), warmup_steps=len(loader) if epochs > 1 else 0)
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            loss, train_top1 = train_epoch(net, loader, classes, optimizer, schedule)
            log.info("finetune epoch %d/%d: loss %.4f, train top-1 %.1f%%", epoch + 1, epochs, loss, train_top1)
    if not math.isfinite(loss):
        raise HgkdError(f"fine-tuning diverged (loss {loss}); lower --lr")
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(x.to(device)).float().cpu() for x in batches(test, batch_size, workers)])
    return {**topk_accuracy(logits, test_i), "train_top1": train_top1, "final_loss": loss,
            "n_classes": len(classes), "n_train": len(train), "n_test": len(test), "epochs": epochs, "lr": lr,
            "weight_decay": weight_decay, "batch_size": batch_size, "hidden": hidden or backbone.num_features,
            "min_scale": min_scale, "optimizer": "adamw", "seconds": time.perf_counter() - start}


def train_epoch(net: nn.Module, loader: DataLoader, classes: Tensor, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler) -> tuple[float, float]:
    """One pass of cross-entropy training; returns the last batch's loss and the epoch's train top-1 (%)."""
    device = model_device(net)
    net.train()
    correct = seen = 0
    for x_bchw, y in loader:
        target = torch.searchsorted(classes, y).to(device)
        logits = net(x_bchw.to(device))
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        correct += (logits.argmax(1) == target).sum().item()
        seen += len(target)
    return loss.item(), 100.0 * correct / max(seen, 1)
