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

Features are a tensor or ``FeatureRows`` of a feature cache (``hgkd.evaluate.features``). A
probe loads them when N x D float32 fits ``memory_mb`` (then the epoch order is one
``randperm`` over all rows); otherwise every epoch reads the cache in shuffled blocks of
``BLOCK_BYTES`` (``block_rows``), a buffer of ``memory_mb`` at a time, shuffled within. kNN scans the train
features block by block, keeping each test sample's running top-k.

Accuracies are percentages. Labels may be any integers: the classes are the distinct training
labels; a test label never seen in training counts as wrong. ``top5`` is top-min(5, C) when
there are fewer than 5 classes (``top5_k`` says which).
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import HgkdError
from .data import LabelledSet
from .features import Features, feature_blocks, in_memory, model_device, pooled_features

log = logging.getLogger(__name__)

HEADS = ("mlp", "linear")
BLOCK_BYTES = 4 * 2**20  # one read from a feature cache (probe); kNN reads KNN_BLOCK_BYTES of the bank
KNN_BLOCK_BYTES = 64 * 2**20
MEMORY_MB = 2048.0  # features up to this size are loaded whole


def block_rows(dim: int, nbytes: int = BLOCK_BYTES) -> int:
    """Rows of ``dim`` float32 features in one read of about ``nbytes`` (at least 256)."""
    return max(256, nbytes // (4 * dim))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block from ``torch.manual_seed(seed)`` and restore the caller's CPU RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def batches(images: Tensor | Dataset | LabelledSet, batch_size: int, workers: int = 0) -> Iterator[Tensor]:
    """Image batches in order from a float tensor (N, 3, H, W), a Dataset or a LabelledSet (eval view)."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    dataset = images.dataset(train=False) if isinstance(images, LabelledSet) else images
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def extract_features(model: nn.Module, images: Tensor | Dataset | LabelledSet, batch_size: int = 64,
                     workers: int = 0) -> Tensor:
    """Features (N, D) float32 on CPU, in the images' order; the model runs on its own device.
    (Held in memory: small sets and tests. Evaluations go through ``features.frozen_features``.)"""
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


def linear_probe(train_feats: Features, train_y: Tensor, test_feats: Features, test_y: Tensor, head: str = "mlp",
                 epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256,
                 hidden: int | None = None, seed: int = 0, device: torch.device | str = "cpu",
                 memory_mb: float = MEMORY_MB) -> dict:
    """Train ``head`` on frozen features with cross-entropy (AdamW); test accuracy after the last epoch."""
    train_i, test_i, classes = class_index(train_y, test_y)
    if len(classes) < 2 or epochs < 1:
        raise HgkdError(f"a probe needs 2+ classes in the training labels (got {len(classes)}) and epochs >= 1")
    x_train = in_memory(train_feats, memory_mb)
    if isinstance(x_train, Tensor):
        x_train = x_train.float().to(device)
    n_train, dim = len(x_train), _dim(x_train)
    y_train = train_i.to(device)
    buffer_rows = max(batch_size, int(memory_mb * 2**20 // (4 * dim)))
    start = time.perf_counter()
    with seeded(seed):
        model = ProbeHead(dim, len(classes), head, hidden).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = cosine_schedule(optimizer, epochs * math.ceil(n_train / batch_size))
        order_rng = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            model.train()
            for x, y in epoch_batches(x_train, y_train, batch_size, order_rng, buffer_rows):
                if len(y) < 2 and n_train > 1:  # BatchNorm cannot standardise one sample
                    continue
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            log.debug("probe epoch %d loss %.4f", epoch, loss.item())
    train_seconds = time.perf_counter() - start
    model.eval()
    train_acc = topk_accuracy(predict(model, x_train, device), train_i)
    result = topk_accuracy(predict(model, in_memory(test_feats, memory_mb), device), test_i)
    return {**result, "train_top1": train_acc["top1"], "final_loss": loss.item(), "n_classes": len(classes),
            "n_train": n_train, "n_test": len(test_feats), "feature_dim": dim,
            "head": head, "hidden": (hidden or dim) if head == "mlp" else None,
            "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
            "optimizer": "adamw", "train_seconds": train_seconds}


def _dim(features: Features) -> int:
    return int(features.shape[1]) if isinstance(features, Tensor) else features.dim


def epoch_batches(features: Features, labels: Tensor, batch_size: int, order_rng: torch.Generator,
                  buffer_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch's shuffled (features, labels) batches.

    In memory: one ``randperm`` over all rows. From the cache: blocks of ``block_rows`` rows
    in random order, loaded ``buffer_rows`` at a time and shuffled within the buffer; the rows
    left over from a buffer start the next one, so every batch but the last is full."""
    if isinstance(features, Tensor):
        for idx in torch.randperm(len(features), generator=order_rng).split(batch_size):
            idx = idx.to(features.device)
            yield features[idx], labels[idx]
        return
    rows = block_rows(features.dim)
    starts = range(0, len(features), rows)
    order = [starts[i] for i in torch.randperm(len(starts), generator=order_rng).tolist()]
    per_buffer = max(1, buffer_rows // rows)
    labels = labels.cpu()
    carry_x, carry_y = torch.zeros(0, features.dim), torch.zeros(0, dtype=labels.dtype)
    for b in range(0, len(order), per_buffer):
        parts = order[b:b + per_buffer]
        x = torch.cat([carry_x] + [features.part(lo, lo + rows) for lo in parts])
        y = torch.cat([carry_y] + [labels[lo:lo + rows] for lo in parts])
        perm = torch.randperm(len(x), generator=order_rng)
        full = len(x) // batch_size * batch_size
        for idx in perm[:full].split(batch_size):
            yield x[idx], y[idx]
        carry_x, carry_y = x[perm[full:]], y[perm[full:]]
    if len(carry_y):
        yield carry_x, carry_y


def predict(model: nn.Module, features: Features, device: torch.device | str) -> Tensor:
    """Scores (N, C) on CPU of an eval-mode head, block by block."""
    with torch.no_grad():
        return torch.cat([model(x.float().to(device)).cpu() for _, x in feature_blocks(features, block_rows(_dim(features)))])


def knn_votes(train_feats: Features, train_i: Tensor, test_feats: Features, num_classes: int, k: int = 20,
              temperature: float = 0.07, chunk: int = 256, bank_rows: int | None = None) -> Tensor:
    """Class votes (N_test, C): sum of exp(cos / T) over each test sample's k most similar train samples.

    The train features are scanned ``bank_rows`` at a time (from memory or the cache); each
    test sample keeps its running top-k similarities and their labels."""
    k = min(k, len(train_feats))
    bank_rows = bank_rows or block_rows(_dim(train_feats), KNN_BLOCK_BYTES)
    votes = []
    for _, test_block in feature_blocks(test_feats, bank_rows):
        test_n = F.normalize(test_block, dim=1)
        best_sim = torch.full((len(test_n), k), -math.inf)
        best_lab = torch.zeros(len(test_n), k, dtype=torch.long)
        for lo, train_block in feature_blocks(train_feats, bank_rows):
            train_n = F.normalize(train_block, dim=1)
            block_i = train_i[lo:lo + len(train_n)]
            for q in range(0, len(test_n), chunk):
                sim = torch.cat([best_sim[q:q + chunk], test_n[q:q + chunk] @ train_n.T], dim=1)
                lab = torch.cat([best_lab[q:q + chunk], block_i.expand(len(sim), -1)], dim=1)
                top_sim, pos = sim.topk(k, dim=1)
                best_sim[q:q + chunk], best_lab[q:q + chunk] = top_sim, lab.gather(1, pos)
        weights = (best_sim / temperature).exp()
        votes.append(torch.zeros(len(test_n), num_classes).scatter_add_(1, best_lab, weights))
    return torch.cat(votes)


def knn_eval(train_feats: Features, train_y: Tensor, test_feats: Features, test_y: Tensor, k: int = 20,
             temperature: float = 0.07) -> dict:
    """Weighted kNN accuracy (top-1, top-5) of the test features against the train features."""
    if k < 1 or temperature <= 0:
        raise HgkdError(f"--k {k} must be >= 1 and --temperature {temperature} > 0")
    train_i, test_i, classes = class_index(train_y, test_y)
    train_feats = train_feats.cpu() if isinstance(train_feats, Tensor) else train_feats
    test_feats = test_feats.cpu() if isinstance(test_feats, Tensor) else test_feats
    votes = knn_votes(train_feats, train_i.cpu(), test_feats, len(classes), k, temperature)
    return {**topk_accuracy(votes, test_i), "n_classes": len(classes), "n_train": len(train_feats),
            "n_test": len(test_feats), "feature_dim": _dim(train_feats), "k": min(k, len(train_feats)),
            "temperature": temperature}
