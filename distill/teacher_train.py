"""``hgkd-distill teacher``: train the classifier teacher the supervised baselines distil from.

A ViT teacher is typically started from its MIM checkpoint (MAE-style fine-tuning); a ResNet
from scratch. ``branches=True`` trains HSAKD's teacher: CE on the unrotated copies plus CE of
every auxiliary branch on the joint labels ``4y + r`` of all four rotations (HSAKD Sec. 3).
Views are drawn like the baselines' student views (crop + flip, no mask, fresh each epoch).
The result (weights + architecture + held-out accuracy) loads with ``weights_only=True``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..devices import resolve_device
from ..errors import HgkdError
from ..data.views import ViewConfig
from .classifier import ClassifierNet, save_classifier
from .config import TeacherConfig
from .data import OnlineViewDataset, ViewCycleSampler, whole_batch
from .rotation_task import joint_labels, rotate_batch, unrotated

log = logging.getLogger(__name__)


def _loader(dataset: OnlineViewDataset, sampler: ViewCycleSampler, workers: int) -> DataLoader:
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers, collate_fn=whole_batch,
                      persistent_workers=workers > 0)


def teacher_loss(net: ClassifierNet, images_bchw: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """CE on the labels; with branches, HSAKD's CE(unrotated) + sum_l CE(branch_l, 4y + r)."""
    if net.branches is None:
        return F.cross_entropy(net(net.normalise(images_bchw)), labels_b)
    out = net.forward_outputs(net.normalise(rotate_batch(images_bchw)))
    joint = joint_labels(labels_b)
    return F.cross_entropy(unrotated(out.logits), labels_b) + sum(
        F.cross_entropy(branch, joint) for branch in out.branch_logits)


@torch.no_grad()
def accuracy(net: ClassifierNet, data: list[str], batch_size: int = 128) -> float:
    """Top-1 (%) on centre-ish views of labelled data (view 0, full-image crop scale)."""
    view = ViewConfig(img_size=net.img_size, mask_ratio=0.0, scale=(1.0, 1.0), hflip=0.0)
    dataset = OnlineViewDataset(data, view, labelled=True)
    net.eval()
    device = next(net.parameters()).device
    correct = total = 0
    for start in range(0, dataset.num_samples, batch_size):
        batch = dataset[list(range(start, min(start + batch_size, dataset.num_samples)))]
        pred = net(net.normalise(batch.images.to(device))).argmax(1).cpu()
        correct += int((pred == batch.labels).sum())
        total += len(batch.labels)
    return 100.0 * correct / max(total, 1)


def train_teacher(cfg: TeacherConfig) -> dict[str, float]:
    """Train, save to ``cfg.out`` and return {'train_loss', 'test_top1' (when test data is given)}."""
    from .train import make_dir

    out = Path(cfg.out)
    if out.exists():
        raise HgkdError(f"--out {out} already exists; choose a new file (teachers are not overwritten)")
    make_dir(out.parent, "--out")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, per_rank=True)
    views = ViewConfig(img_size=cfg.img_size, mask_ratio=0.0, seed=cfg.seed, views_per_image=cfg.epochs,
                       scale=tuple(cfg.crop_scale))
    dataset = OnlineViewDataset(cfg.data, views, labelled=True)
    num_classes = cfg.num_classes or dataset.num_classes
    if dataset.num_classes > num_classes:
        raise HgkdError(f"--num-classes {num_classes}: the data has labels up to {dataset.num_classes - 1}")
    net = ClassifierNet(cfg.arch, num_classes, cfg.img_size, cfg.branches, cfg.init_checkpoint).to(device)
    sampler = ViewCycleSampler(dataset.num_samples, cfg.epochs, cfg.batch_size, cfg.seed)
    optimizer = create_optimizer_v2(net, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(sampler)
    scheduler = CosineLRScheduler(optimizer, t_initial=steps, lr_min=1e-6, warmup_lr_init=1e-6,
                                  warmup_t=cfg.warmup_epochs * len(sampler), t_in_epochs=False)
    loader, step, losses = _loader(dataset, sampler, cfg.workers), 0, []
    bar = tqdm(total=steps, desc="classifier teacher", unit="step", dynamic_ncols=True)  # issue 10: a bar of its own
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        net.train()
        for batch in loader:
            loss = teacher_loss(net, batch.images.to(device), batch.labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            losses.append(float(loss.detach()))
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
            bar.update(1)
        log.info("teacher epoch %d: loss %.4f", epoch, np.mean(losses[-len(sampler):]))
    bar.close()
    result = {"train_loss": float(np.mean(losses[-len(sampler):]))}
    if cfg.test_data:
        result["test_top1"] = accuracy(net, cfg.test_data)
    save_classifier(net.cpu(), out, extra={"metrics": result, "config": {**asdict(cfg), "crop_scale": list(cfg.crop_scale)}})
    return result
