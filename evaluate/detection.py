"""COCO detection / instance segmentation transfer: fine-tune a detector around the trunk, score it.

The H-GKD paper's other two evaluations (Sec. 4.1, Table 4): torchvision's Faster R-CNN or
Mask R-CNN with an FPN over the student (``hgkd.evaluate.detector``), every layer fine-tuned
with the 1x recipe (``hgkd.evaluate.detection_recipe``) on COCO-format data
(``hgkd.evaluate.coco_data``), then scored by pycocotools' COCOeval (``hgkd.evaluate.coco_eval``),
box AP and, for Mask R-CNN, mask AP.

Training walks a fixed order per epoch (``(seed, epoch)``) in global batches of ``batch_size``
images; under torchrun each rank takes its contiguous slice of every batch (as
``hgkd.evaluate.finetune``) and DDP averages the gradients; DataLoader workers read and decode
each batch. The torch RNG (torchvision's per-image size draw and its RPN/RoI sampling) is seeded
from ``seed`` and saved in every checkpoint with the iteration, the model and the optimizer, so
``resume`` continues a run exactly where it stopped (mid-epoch too): the result equals an
uninterrupted run. Checkpoints go to ``checkpoint_dir`` every ``checkpoint_every`` iterations
and at every epoch end, and after the current iteration once SIGTERM/SIGUSR1 arrive
(``hgkd.preemption``, issue 21; every rank stops at the same iteration), which then raises
``Resumable``: ``resume`` continues it. bf16 autocast on CUDA. Testing runs on every rank over its share of the
test images; rank 0 gathers the detections, writes them in COCO results format, scores them and
sends the scores to the other ranks.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ..data.digit_detection import BUILTIN, write_digit_detection
from ..devices import resolve_device
from ..errors import HgkdError, Resumable
from ..preemption import StopSignals, stop_signals
from .coco_data import CocoSet, batches_of, collate, load_coco
from .coco_eval import METRICS, score, to_results, write_results
from .detection_checkpoint import CheckpointFile
from .detection_recipe import AUTO, DetectionRecipe
from .detector import build_detector, check_trunk_used, set_sizes, sync_batchnorm
from .finetune import process_group, stop_agreed
from .trunks import load_trunk

log = logging.getLogger(__name__)

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def detection_task(model: str | nn.Module, train: str | list[str], test: str | list[str] | None, *, seed: int = 0,
                   device: str = "auto", batch_size: int | None = None, workers: int = 0,
                   train_images: str | None = None, test_images: str | None = None, out: str | None = None,
                   checkpoint_dir: str | None = None, checkpoint_every: int = 0, resume: bool = False,
                   progress: bool = True, recipe: str = AUTO, **options: Any) -> dict[str, Any]:
    """Fine-tune and score a detector on COCO-format data; returns the task's JSON record.

    ``model``: a ``--model`` spec (``hgkd.evaluate.trunks.load_trunk``) or a loaded timm ResNet
    (copied). ``train``/``test``: annotation JSONs with their image folders ``train_images`` /
    ``test_images``, or ``builtin:digit-detection-train`` / ``-val`` (the embedded set, written
    beside ``out``). ``out``: the record's path; the detections go beside it, the checkpoints to
    ``checkpoint_dir`` (default ``<out>.ckpt``). ``recipe``: a named recipe (``RECIPES``; ``auto``:
    ``digits`` on the embedded set, else ``1x``) whose values ``options`` and ``batch_size``
    (images per step over all ranks; None: the recipe's) override.
    """
    start = time.perf_counter()
    if recipe == AUTO:
        recipe = "digits" if all(str(d).startswith(BUILTIN) for d in (train, test) if d) else "1x"
    cfg = DetectionRecipe.from_options(recipe, {**options, "batch_size": batch_size})
    batch_size = cfg.batch_size
    masks = cfg.detector == "maskrcnn"
    train_set, test_set = load_sets(train, train_images, test, test_images, masks, out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world or batch_size < world:
        raise HgkdError(f"detection on {world} ranks needs --batch-size divisible by {world} (got {batch_size})")
    spec = model if isinstance(model, str) else type(model).__name__
    trunk = load_trunk(model, seed=seed) if isinstance(model, str) else copy.deepcopy(model)
    trunk_state = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
    dev = resolve_device(device, per_rank=world > 1)
    ckpt = CheckpointFile.beside(out, checkpoint_dir)
    config = {"model": spec, "train": train_set.name, "test": test_set.name, "batch_size": batch_size, "seed": seed,
              "ranks": world, **{k: v for k, v in cfg.to_dict().items() if k != "epochs"}}
    with process_group(dev) as rank, seeded(seed, dev):
        net = build_detector(trunk, train_set.num_classes, arch=spec, detector=cfg.detector, norm=cfg.norm,
                             train_sizes=cfg.train_sizes, max_size=cfg.max_size, width=cfg.width,
                             rois_per_image=cfg.rois_per_image, proposals=cfg.proposals,
                             detections_per_image=cfg.detections_per_image)
        check_trunk_used(trunk_state, net, spec)
        net = sync_batchnorm(net.to(dev), world, dev)
        trainer = Trainer(net, train_set, cfg, batch_size=batch_size, workers=workers, seed=seed, rank=rank,
                          world=world, ckpt=ckpt, config=config, checkpoint_every=checkpoint_every, progress=progress)
        trainer.restore(resume)
        with stop_signals() if ckpt else nullcontext() as stop:  # no checkpoint to leave: signals end the run
            stats = trainer.fit(stop)
        results = predict(net, test_set, cfg, max(batch_size // world, 1), workers, rank, world, masks)
        scores = [score_results(results, test_set, out) if rank == 0 else None]
        if world > 1:  # rank 0 scores; every rank returns the same record
            dist.broadcast_object_list(scores, src=0)
    record = {"task": "detection", "model": spec, "detector": cfg.detector, "norm": cfg.norm,
              "n_train": len(train_set), "n_test": len(test_set), "n_classes": train_set.num_classes,
              "train": train_set.name, "test": test_set.name, "batch_size": batch_size, "seed": seed,
              "device": str(dev), "ranks": world, **stats, "recipe_name": recipe, "recipe": cfg.to_dict(),
              **scores[0]}
    record["seconds"] = time.perf_counter() - start
    return record


def score_results(results: dict[str, list[dict[str, Any]]], test_set: CocoSet, out: str | None) -> dict[str, Any]:
    """Write the detections beside ``out`` (COCO results format), then COCOeval per iou type."""
    found = {"detections": write_results(results, out) if out else None, "n_detections": len(results["bbox"])}
    gt = test_set.coco()
    return {**found, **{iou_type: score(gt, dets, iou_type) for iou_type, dets in results.items()}}


def load_sets(train: str | list[str], train_images: str | None, test: str | list[str] | None,
              test_images: str | None, masks: bool, out: str | None) -> tuple[CocoSet, CocoSet]:
    """The training set (images with instances only) and the test set, categories checked equal."""
    train_ann, train_root = _resolve(train, train_images, "--train", out)
    if not test:
        raise HgkdError("detection needs --test annotations (COCO val), or builtin:digit-detection-val")
    test_ann, test_root = _resolve(test, test_images, "--test", out)
    train_set = load_coco(train_ann, train_root, masks, "--train").for_training()
    test_set = load_coco(test_ann, test_root, masks, "--test")
    if train_set.category_ids != test_set.category_ids:
        raise HgkdError(f"--test {test_ann}: categories {test_set.category_ids[:10]} differ from --train's "
                        f"{train_set.category_ids[:10]}")
    return train_set, test_set


def _resolve(data: str | list[str], images: str | None, option: str, out: str | None) -> tuple[str, str]:
    """(annotation JSON, image folder) of a data spec; ``builtin:digit-detection-<split>`` is written
    next to ``out`` (or under ``~/.cache/hgkd``) on first use."""
    specs = [data] if isinstance(data, str) else list(data)
    if len(specs) != 1:
        raise HgkdError(f"{option}: give one COCO annotation JSON (got {len(specs)})")
    spec = specs[0]
    if spec.startswith(BUILTIN + "-"):
        split = spec[len(BUILTIN) + 1:]
        if split not in ("train", "val"):
            raise HgkdError(f"{option} {spec}: the embedded set has {BUILTIN}-train and {BUILTIN}-val")
        where = Path(out).parent if out else Path.home() / ".cache" / "hgkd"
        return write_digit_detection(where / "digit-detection")[split]
    if not images:
        raise HgkdError(f"{option} {spec}: give its image folder with {option}-images")
    return spec, images


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block from ``torch.manual_seed(seed)``; the caller's RNG (CPU and ``device``) is restored."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class EpochBatches(Sampler[list[int]]):
    """This rank's slice of each global batch of one epoch, from batch ``start`` on.

    The order is a permutation drawn from ``(seed, epoch)``; the global batches are its
    consecutive ``batch_size`` runs (the last incomplete one dropped unless it is the only one),
    cut into ``world`` contiguous slices as ``hgkd.evaluate.finetune.GlobalBatchSlices`` does."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start: int = 0) -> None:
        order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
        count = max(n // batch_size, 1)
        batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]
        self.batches = [b[len(b) * rank // world:len(b) * (rank + 1) // world] for b in batches[start:]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @staticmethod
    def per_epoch(n: int, batch_size: int) -> int:
        return max(n // batch_size, 1)


class Trainer:
    """SGD over the recipe's schedule, with checkpoints and exact resume (see module docstring)."""

    def __init__(self, net: nn.Module, data: CocoSet, cfg: DetectionRecipe, *, batch_size: int, workers: int,
                 seed: int, rank: int, world: int, ckpt: CheckpointFile | None, config: dict[str, Any],
                 checkpoint_every: int, progress: bool) -> None:
        self.net, self.cfg, self.batch_size, self.workers, self.seed = net, cfg, batch_size, workers, seed
        self.rank, self.world, self.ckpt, self.config = rank, world, ckpt, config
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.device = next(net.parameters()).device
        self.dataset = data.dataset(masks=cfg.detector == "maskrcnn", train=True, seed=seed, flip=cfg.flip)
        self.iters_per_epoch = EpochBatches.per_epoch(len(data), batch_size)
        self.total = cfg.epochs * self.iters_per_epoch
        self.optimizer = torch.optim.SGD(param_groups(net, cfg.weight_decay), lr=cfg.scaled_lr(batch_size),
                                         momentum=cfg.momentum)
        self.trained = net if world == 1 else DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.iteration, self.loss, self.seconds = 0, float("nan"), 0.0
        self.resumed = False

    def restore(self, resume: bool) -> None:
        """Continue from the checkpoint with ``resume``; refuse to overwrite one without it."""
        if self.ckpt is None:
            if resume:
                raise HgkdError("--resume needs checkpoints: give --out or --checkpoint-dir")
            return
        state = self.ckpt.load(self.config, resume, self.rank)
        self.resumed = resume
        if state is None:
            return
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration, self.loss, self.seconds = state["iteration"], state["loss"], state["seconds"]
        torch.set_rng_state(state["rng"][self.rank]["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"][self.rank]["cuda"], self.device)
        log.info("resumed %s at iteration %d of %d", self.ckpt.path, self.iteration, self.total)

    def fit(self, stop: StopSignals | None = None) -> dict[str, Any]:
        """Train to ``epochs``; returns the training figures of the record. Once ``stop`` is requested
        (on any rank) the iteration in progress ends, a checkpoint is written and ``Resumable`` raised."""
        set_sizes(self.net, self.cfg.train_sizes)
        bar = tqdm(total=self.total, initial=self.iteration, desc="detection", unit="it", dynamic_ncols=True,
                   disable=not self.progress or self.rank != 0)
        images, begin = 0, time.perf_counter()
        while self.iteration < self.total:
            epoch, step = divmod(self.iteration, self.iters_per_epoch)
            for image_list, targets in batches_of(self._loader(epoch, step)):
                self._step(image_list, targets)
                images += self.batch_size
                rate = images / max(time.perf_counter() - begin, 1e-9)
                bar.set_postfix(loss=f"{self.loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
                bar.update(1)
                at_epoch_end = self.iteration % self.iters_per_epoch == 0
                saved = at_epoch_end or (self.checkpoint_every and self.iteration % self.checkpoint_every == 0)
                signal_name = stop_agreed(stop, self.world, self.device)
                if saved or signal_name:
                    self._save(time.perf_counter() - begin)
                if signal_name:
                    bar.close()
                    if self.world > 1:  # no rank exits before rank 0 has written the checkpoint
                        dist.barrier()
                    again = "again" if self.resumed else "with --resume"
                    raise Resumable(f"{self.ckpt.path}: {signal_name} at iteration {self.iteration} of {self.total}; "
                                    f"resumable: run the same command {again}")
            log.info("detection epoch %d/%d: loss %.4f", epoch + 1, self.cfg.epochs, self.loss)
        bar.close()
        seconds = time.perf_counter() - begin
        return {"epochs": self.cfg.epochs, "iterations": self.total, "final_loss": self.loss,
                "lr": self.cfg.scaled_lr(self.batch_size), "train_images_per_s": images / seconds if images else None}

    def _loader(self, epoch: int, start: int) -> DataLoader:
        self.dataset.set_epoch(epoch)
        batches = EpochBatches(len(self.dataset), self.batch_size, self.seed, epoch, self.rank, self.world, start)
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=collate,
                          generator=torch.Generator().manual_seed(self.seed))

    def _step(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> None:
        self.net.train()
        lr = self.cfg.lr_at(self.iteration, self.iters_per_epoch, self.batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = [x.to(self.device, non_blocking=True) for x in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast(self.device):
            losses = self.trained(images, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        self.loss = mean_over_ranks(loss.detach().float(), self.world)
        if not math.isfinite(self.loss):
            raise HgkdError(f"detection fine-tuning diverged at iteration {self.iteration} (loss {self.loss}); "
                            "lower --lr or raise --warmup-iters")

    def _save(self, seconds: float) -> None:
        if self.ckpt is None:
            return
        rng = {"cpu": torch.get_rng_state(),
               **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})}
        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if self.rank == 0:
            self.ckpt.save({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "iteration": self.iteration, "loss": self.loss, "seconds": seconds, "rng": rngs,
                            "config": self.config})


def param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, norm layers' without weight decay (detectron2's WEIGHT_DECAY_NORM=0)."""
    norm, other = [], []
    for module in net.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (norm if isinstance(module, NORM_TYPES) else other).append(param)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": 0.0}]


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


@torch.no_grad()
def predict(net: nn.Module, data: CocoSet, cfg: DetectionRecipe, batch_size: int, workers: int, rank: int,
            world: int, masks: bool) -> dict[str, list[dict[str, Any]]]:
    """COCO results of every test image at the test size (each rank its share; all on rank 0)."""
    device = next(net.parameters()).device
    net.eval()
    set_sizes(net, (cfg.test_size,))
    dataset = data.dataset(masks=False, train=False)
    mine = list(range(rank, len(dataset), world))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    results: dict[str, list[dict[str, Any]]] = {"bbox": [], **({"segm": []} if masks else {})}
    for images, targets in batches_of(DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                                 collate_fn=collate)):
        with autocast(device):
            outputs = net([x.to(device) for x in images])
        found = to_results(outputs, [int(t["image_id"]) for t in targets], data.category_ids, masks)
        for iou_type in results:
            results[iou_type] += found[iou_type]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = {t: [r for part in gathered for r in part[t]] for t in results}
    return results


def summary_table(record: dict[str, Any]) -> str:
    """The AP table the CLI prints: one row per iou type, COCOeval's six numbers."""
    head = (f"detection {record['model']} ({record['detector']}, {record['norm']} norm): {record['epochs']} epochs, "
            f"{record['n_train']} train / {record['n_test']} test images, {record['n_classes']} classes")
    rows = ["       " + " ".join(f"{m:>6}" for m in METRICS)]
    for iou_type in ("bbox", "segm"):
        if iou_type in record:
            rows.append(f"  {iou_type:<4} " + " ".join("     -" if record[iou_type][m] is None
                                                      else f"{record[iou_type][m]:6.2f}" for m in METRICS))
    return "\n".join([head, *rows])
