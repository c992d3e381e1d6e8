"""Frozen-feature evaluation: feature extraction, the MLP/linear probe and weighted kNN.

* ``extract_features``: the backbone's globally average-pooled penultimate features
  (timm ``forward_head(forward_features(x), pre_logits=True)``), no grad, eval mode.
* ``linear_probe``: H-GKD Sec. 4.1's probe head, average pool -> Linear -> ReLU -> Linear, on
  frozen features (``head="linear"``: a single Linear). As in MAE's linear probe (He et al. 2022,
  Sec. A.2) the features are first standardised by a BatchNorm without affine parameters.
  Trained with cross-entropy and AdamW (cosine schedule per step, no warm-up): unlike MAE's
  LARS at batch 16,384, AdamW needs no per-model learning-rate search on small sets and CPUs.
  The reported accuracy is the last epoch's - the test set never selects anything.
* ``knn_eval``: cosine-similarity kNN with temperature-weighted votes, ``exp(sim / T)``
  (Wu et al. 2018 InstDisc, Eq. 8; DINO's ``eval_knn``: k=20, T=0.07).

Accuracies are percentages. Labels may be any integers: the classes are the distinct training
labels; a test label never seen in training counts as wrong. ``top5`` is top-min(5, C) when
there are fewer than 5 classes (``top5_k`` says which).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import HgkdError
from .data import LabelledSet

log = logging.getLogger(__name__)

HEADS = ("mlp", "linear")


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block from ``torch.manual_seed(seed)`` and restore the caller's CPU RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batches(images: Tensor | Dataset | LabelledSet, batch_size: int, workers: int = 0) -> Iterator[Tensor]:
    """Image batches in order from a float tensor (N, 3, H, W), a Dataset or a LabelledSet (eval view)."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    dataset = images.dataset(train=False) if isinstance(images, LabelledSet) else images
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def pooled_features(model: nn.Module, x_bchw: Tensor) -> Tensor:
    """Global-average-pooled penultimate features (B, D) of a timm model."""
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x_bchw), pre_logits=True)
    return model(x_bchw)


def extract_features(model: nn.Module, images: Tensor | Dataset | LabelledSet, batch_size: int = 64,
                     workers: int = 0) -> Tensor:
    """Features (N, D) float32 on CPU, in the images' order; the model runs on its own device."""
    device, was_training = model_device(model), model.training
    model.eval()
    feats = []
    with torch.no_grad():  # not inference_mode: the features later feed a trained head
        for x_bchw in batches(images, batch_size, workers):
            feats.append(pooled_features(model, x_bchw.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(feats)


def class_index(train_y: Tensor, test_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Labels -> positions in the sorted distinct training labels; unseen test labels -> -1."""
    classes = torch.unique(train_y.long())
    train_i = torch.searchsorted(classes, train_y.long())
    pos = torch.searchsorted(classes, test_y.long()).clamp(max=len(classes) - 1)
    test_i = torch.where(classes[pos] == test_y.long(), pos, torch.full_like(pos, -1))
    return train_i, test_i, classes


def topk_accuracy(scores_nc: Tensor, target_n: Tensor) -> dict[str, float]:
    """top-1 and top-min(5, C) accuracy in percent of class scores against class positions."""
    k5 = min(5, scores_nc.shape[1])
    pred = scores_nc.topk(k5, dim=1).indices
    hits = pred == target_n.view(-1, 1).to(pred.device)
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item(),
            "top5_k": k5}


class ProbeHead(nn.Sequential):
    """[BatchNorm (no affine)] -> Linear -> ReLU -> Linear, or [BatchNorm] -> Linear for ``linear``."""

    def __init__(self, in_dim: int, num_classes: int, kind: str = "mlp", hidden: int | None = None,
                 standardize: bool = True) -> None:
        if kind not in HEADS:
            raise ValueError(f"head {kind!r} not in {HEADS}")
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)] if standardize else []
        if kind == "mlp":
            width = hidden or in_dim
            layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True), nn.Linear(width, num_classes)]
        else:
            layers.append(nn.Linear(in_dim, num_classes))
        super().__init__(*layers)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine to zero, stepped once per optimizer step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def linear_probe(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor, head: str = "mlp",
                 epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256,
                 hidden: int | None = None, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Train ``head`` on frozen features with cross-entropy (AdamW); test accuracy after the last epoch."""
    train_i, test_i, classes = class_index(train_y, test_y)
    if len(classes) < 2 or epochs < 1:
        raise HgkdError(f"a probe needs 2+ classes in the training labels (got {len(classes)}) and epochs >= 1")
    x_train, y_train = train_feats.float().to(device), train_i.to(device)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    with seeded(seed):
        model = ProbeHead(x_train.shape[1], len(classes), head, hidden).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = cosine_schedule(optimizer, epochs * steps_per_epoch)
        order_rng = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(x_train), generator=order_rng).split(batch_size):
                if len(idx) < 2 and len(x_train) > 1:  # BatchNorm cannot standardise one sample
                    continue
                loss = F.cross_entropy(model(x_train[idx.to(device)]), y_train[idx.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            log.debug("probe epoch %d loss %.4f", epoch, loss.item())
    model.eval()
    with torch.no_grad():
        train_acc = topk_accuracy(model(x_train).cpu(), train_i)
        result = topk_accuracy(model(test_feats.float().to(device)).cpu(), test_i)
    return {**result, "train_top1": train_acc["top1"], "final_loss": loss.item(), "n_classes": len(classes),
            "n_train": len(train_feats), "n_test": len(test_feats), "feature_dim": int(train_feats.shape[1]),
            "head": head, "hidden": (hidden or int(train_feats.shape[1])) if head == "mlp" else None,
            "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
            "optimizer": "adamw"}


def knn_votes(train_feats: Tensor, train_i: Tensor, test_feats: Tensor, num_classes: int, k: int = 20,
              temperature: float = 0.07, chunk: int = 256) -> Tensor:
    """Class votes (N_test, C): sum of exp(cos / T) over each test sample's k most similar train samples."""
    train_n = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train_n))
    votes = []
    for test_chunk in F.normalize(test_feats.float(), dim=1).split(chunk):
        sim, nearest = (test_chunk @ train_n.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes.append(torch.zeros(len(test_chunk), num_classes).scatter_add_(1, train_i[nearest], weights))
    return torch.cat(votes)


def knn_eval(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor, k: int = 20,
             temperature: float = 0.07) -> dict:
    """Weighted kNN accuracy (top-1, top-5) of the test features against the train features."""
    if k < 1 or temperature <= 0:
        raise HgkdError(f"--k {k} must be >= 1 and --temperature {temperature} > 0")
    train_i, test_i, classes = class_index(train_y, test_y)
    votes = knn_votes(train_feats.cpu(), train_i.cpu(), test_feats.cpu(), len(classes), k, temperature)
    return {**topk_accuracy(votes, test_i), "n_classes": len(classes), "n_train": len(train_feats),
            "n_test": len(test_feats), "feature_dim": int(train_feats.shape[1]), "k": min(k, len(train_feats)),
            "temperature": temperature}
