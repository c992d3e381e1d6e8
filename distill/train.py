"""Stage two: train a student with one registered distillation method (H-GKD Sec. 3.2 by default).

One step: the method prepares the batch (HSAKD: rotations), the teacher's outputs are read
from the batch (cache / live MIM teacher) or computed by a frozen classifier teacher, the
student runs on exactly those pixels (H-GKD: the teacher's masked view), the method returns
its loss terms; LAMB (or any timm optimizer) with grad-norm clipping, per-step cosine
schedule with warm-up (timm). An epoch is one pass over the images, so ``--epochs`` and
``--warmup-epochs`` count image passes whatever the views per image (issue 12); what the run
consumed goes to ``RUN/cost.json``. Runs single-process or under torchrun (DDP; gloo on CPU).

Long runs on a real cluster (issue 21): one process trains in a run directory at a time
(``RUN/.lock``); ``--resume auto`` continues a run directory that holds a checkpoint and
starts one that does not, so one command line serves a first start, a requeue after
preemption and a ``torchrun --max-restarts`` restart. SIGTERM/SIGUSR1 stop the run at the
next step boundary (the same step on every rank) with a checkpoint and ``Resumable``. A step
whose loss terms or gradient norm are not finite is never applied: the run stops with one
line (``--nonfinite stop``) or skips and counts it (``--nonfinite skip``), the same decision
on every rank.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..devices import join_process_group, resolve_device
from ..errors import HgkdError, Resumable
from ..preemption import StopSignals, stop_signals
from ..pixels import normalize_uint8, pixel_stats
from ..run_layout import LAST, checkpoint_dir, checkpoints_present
from ..storage.metadata import teacher_identity
from .checkpoint import RunLock, resume_checkpoint, rng_state, save_checkpoint, set_rng_state
from .classifier import ClassifierNet
from .config import RESUME_MODES, DistillConfig
from .cost import CostLedger, RunCost
from .data import Batch, whole_batch
from .methods import DistillMethod, MethodContext, NetDims, create_method, method_class, method_options
from .outputs import NetOutputs
from .students import STRIDES, create_encoder
from .students.backend_choice import choose_sparse_backend
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
    join_process_group(device)
    return Dist(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Dist()


def build_student(cfg: DistillConfig, embed_dim: int, patch_size: int) -> HgkdStudent:
    """Student whose output matches the teacher's token grid and width."""
    encoder = create_encoder(cfg.student, backend=cfg.encoder_backend)
    return HgkdStudent(encoder, out_dim=embed_dim, patch_size=patch_size, decoder_width=cfg.decoder_width,
                       unet=cfg.unet)


class DistillStep(nn.Module):
    """Student + method in one module, so DDP syncs the method's trainable parts too."""

    def __init__(self, student: nn.Module, method: DistillMethod, amp: torch.dtype | None = None) -> None:
        super().__init__()
        self.student, self.method, self.amp = student, method, amp

    def forward(self, images_bchw: torch.Tensor, visible_bhw: torch.Tensor | None, teacher: NetOutputs,
                labels_b: torch.Tensor | None, index_b: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Student under autocast (bf16 on CUDA), the method's losses in float32."""
        with torch.autocast(images_bchw.device.type, dtype=self.amp, enabled=self.amp is not None):
            student = self.student.forward_outputs(images_bchw, visible_bhw)
        return self.method(student.float(), teacher.float(), labels_b, index_b)


def resume_mode(resume: str | bool) -> str:
    """``--resume`` never|auto|always; a bool (older callers) is always/never."""
    mode = ("always" if resume else "never") if isinstance(resume, bool) else resume
    if mode not in RESUME_MODES:
        raise HgkdError(f"--resume {mode!r}: choose one of {', '.join(RESUME_MODES)}")
    return mode


class Trainer:
    """Owns model, optimizer, schedule, queue and position; ``fit`` runs to cfg.epochs.

    ``resume``: "never" (refuse a run directory holding a checkpoint), "always" (continue
    from its newest intact checkpoint; none is an error) or "auto" (continue when there is
    one, start when there is none), issue 21.
    """

    def __init__(self, cfg: DistillConfig, resume: str | bool = "never") -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.resume_mode = resume_mode(resume)
        self.device = resolve_device(cfg.device, per_rank=True)
        self.backend_choice = choose_sparse_backend(cfg.sparse_backend, self.device)
        self.cfg = replace(cfg, sparse_backend=self.backend_choice.name)  # config.yaml keeps what ran
        self.dist = init_distributed(self.device)
        self.lock = RunLock(self.run_dir)
        try:
            self._setup()
        except BaseException:
            self.lock.release()
            raise

    def _take_lock(self) -> None:
        """The main rank holds ``RUN/.lock`` (the other ranks share its run directory)."""
        if self.dist.main:
            self.lock.acquire()

    def _find_checkpoint(self) -> dict[str, Any] | None:
        """What the resume mode reads (None: start a new run); one-line errors otherwise."""
        if self.resume_mode == "never":
            if checkpoints_present(self.run_dir):
                raise HgkdError(f"--out {self.run_dir} already holds a run; continue it with --resume auto (or "
                                f"--resume) or use a new --out")
            return None
        found = resume_checkpoint(self.run_dir, warn=self.dist.main)
        self._agree_on_checkpoint(found)
        if found is None:
            if self.resume_mode == "always":
                raise HgkdError(f"{self.run_dir}: no checkpoint there; start without --resume (or with --resume "
                                f"auto) or check --out")
            return None
        self.last_saved = (found[0], found[1].get("global_step", 0))
        return found[1]

    def _agree_on_checkpoint(self, found: tuple[Path, dict[str, Any]] | None) -> None:
        """Every rank resumes from the same checkpoint and step, or the run stops with one line
        (one node's read error must not make it continue from prev.pt while the others take last.pt)."""
        if self.dist.world_size <= 1:
            return
        mine = None if found is None else (found[0].name, found[1].get("global_step"))
        every: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(every, mine)
        if any(choice != every[0] for choice in every):
            seen = ", ".join(f"rank {r}: {c[0]} step {c[1]}" if c else f"rank {r}: none" for r, c in enumerate(every))
            raise HgkdError(f"{self.run_dir}: the ranks read different checkpoints ({seen}); every rank must see "
                            f"the same files - check the file system of --out on each node, then run again")

    def _setup(self) -> None:
        cfg = self.cfg
        if self.run_dir.is_dir():
            self._take_lock()  # before reading its checkpoints (a new directory: in fit, once made)
        torch.manual_seed(cfg.seed)
        self.supervised = method_class(cfg.method).supervised
        self.last_saved: tuple[Path, int] | None = None  # the newest checkpoint known good: path, step
        resumed = self._find_checkpoint()
        self.started_fresh = resumed is None
        # a run that used every cached view (--cache-views 0) keeps the views it started with when the
        # cache has grown since: the original command resumes it (issue 22)
        started = resumed.get("views") if resumed and cfg.cache and not cfg.online_teacher else None
        self.targets = make_targets(cfg, self.device, supervised=self.supervised, views=started or None)
        self.dataset = self.targets.dataset
        self.teacher = run_teacher_identity(cfg, self.targets)
        if cfg.batch_size % self.dist.world_size:
            raise HgkdError(f"--batch-size {cfg.batch_size} must be divisible by the {self.dist.world_size} ranks")
        self.sampler = self.targets.sampler(cfg.batch_size // self.dist.world_size, cfg.seed,
                                            self.dist.rank, self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        self.model = self._build_student().to(self.device)
        ctx = MethodContext(student=self.student_dims, teacher=self.targets.dims, num_samples=self.targets.num_samples)
        self.method = create_method(cfg.method, ctx, **method_options(cfg.method, cfg, cfg.method_opts)).to(self.device)
        self.amp = torch.bfloat16 if (cfg.amp and self.device.type == "cuda") else None
        self.step_module = DistillStep(self.model, self.method, self.amp)
        self.optimizer = create_optimizer_v2(self.step_module, cfg.optimizer, lr=cfg.lr,
                                             weight_decay=cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=total, lr_min=1e-6, warmup_lr_init=1e-6,
                                           warmup_t=cfg.warmup_epochs * self.steps_per_epoch, t_in_epochs=False)
        self.ddp = (DistributedDataParallel(self.step_module, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
                    if self.dist.world_size > 1 else self.step_module)
        self.mean, self.std = pixel_stats(device=self.device)
        self.epoch, self.next_batch, self.global_step = 0, 0, 0
        self.skipped_steps, self.remote_retries = 0, 0  # non-finite steps skipped; remote read retries
        self._loader: DataLoader | None = None
        cost = RunCost(method=cfg.method, targets=self.targets.kind, cache=cfg.cache or None, views=self.targets.views,
                       student_mask=cfg.student_mask, cache_bytes_per_view=self.targets.bytes_per_view)
        self.ledger = CostLedger(cost, cache_rows=self.targets.cache_rows)
        if resumed is not None:
            self._restore(resumed)
        else:
            self._prefill_queue()
        self.scheduler.step_update(self.global_step)

    def _build_student(self) -> nn.Module:
        """H-GKD: sparse encoder + decoder to the teacher's tokens; baselines: a classifier."""
        cfg = self.cfg
        if self.supervised:
            net = ClassifierNet(cfg.student, self.targets.dims.num_classes, img_size=self.targets.img_size)
            self.student_dims = net.dims
            return net
        if self.targets.img_size % STRIDES[-1]:
            option = "--img-size" if cfg.online_teacher else f"--cache {cfg.cache}:"
            raise HgkdError(f"{option} views of {self.targets.img_size} px do not fit the student's stride-"
                            f"{STRIDES[-1]} ResNet; use a multiple of {STRIDES[-1]} (extract with --img-size "
                            f"{(self.targets.img_size // STRIDES[-1] + 1) * STRIDES[-1]})")
        student = build_student(cfg, self.targets.embed_dim, self.targets.patch_size)
        self.student_dims = NetDims(tuple(student.encoder.channels), self.targets.embed_dim)
        return student

    # ---- state -------------------------------------------------------------------------
    def _prefill_queue(self) -> None:
        """Give the method the teacher's pooled embeddings it asks for before step one (H-GKD's
        queue): read from the cache, or computed by a live teacher (its forwards are counted)."""
        size = self.method.prefill_size() if self.cfg.prefill_queue else 0
        if not size:
            return
        rows = self.targets.prefill_rows(size, self.cfg.seed)
        forwards = self.targets.forwards
        pooled = self.targets.prefill(rows)
        if pooled is not None:
            self.method.prefill(pooled)
            self.ledger.use_views(rows)
            self.ledger.add_forwards(self.targets.forwards - forwards)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(), "rng": rng_state(), "epoch": self.epoch,
                "next_batch": self.next_batch, "global_step": self.global_step, "config": self.cfg.to_dict(),
                "targets_fingerprint": self.targets.fingerprint, "teacher": self.teacher, "views": self.targets.views,
                "cost": self.ledger.state(),
                "counters": {"skipped_steps": self.skipped_steps, "remote_retries": self.remote_retries}}

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("targets_fingerprint") != self.targets.fingerprint:
            raise HgkdError(f"--resume: {self.run_dir} was trained on other teacher targets (cache, teacher or "
                            f"data differ); resume with the original --cache/--online-teacher and --data")
        saved = DistillConfig.from_dict(ckpt["config"])
        for key in ("method", "method_opts", "student", "sparse", "unet", "similarity", "decoder_width", "queue_size",
                    "batch_size", "seed", "cache_views", "online_views", "student_mask", "teacher_view"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise HgkdError(f"--resume: option {key} was {getattr(saved, key)!r} in {self.run_dir}, "
                                f"now {getattr(self.cfg, key)!r}; resume with the original options")
        if ckpt.get("views", self.targets.views) != self.targets.views:
            raise HgkdError(f"--resume: {self.run_dir} cycled {ckpt['views']} views per image, now "
                            f"{self.targets.views}; resume with the command that started it")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.next_batch, self.global_step = ckpt["epoch"], ckpt["next_batch"], ckpt["global_step"]
        if "cost" in ckpt:  # runs checkpointed before the cost ledger (issue 12) start it afresh
            self.ledger.load_state(ckpt["cost"])
        counters = ckpt.get("counters", {})  # checkpoints before issue 21 count from 0
        self.skipped_steps = counters.get("skipped_steps", 0)
        self.remote_retries = counters.get("remote_retries", 0)

    def save(self) -> None:
        """Checkpoint, then the cost ledger as of that checkpoint; non-finite weights are never
        written (they would replace the last good checkpoint)."""
        params = [p.detach() for p in self.step_module.parameters()]
        if params and not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
            raise HgkdError(f"{self.run_dir}: the weights became non-finite by step {self.global_step} (a finite "
                            f"loss, a too large update); not checkpointed; last good checkpoint "
                            f"{self._last_saved_text()}; lower --lr")
        if self.dist.main:
            save_checkpoint(self.run_dir, self.state())
            self.write_cost()
        self.last_saved = (checkpoint_dir(self.run_dir) / LAST, self.global_step)

    def _last_saved_text(self) -> str:
        if self.last_saved is None:
            return "none (no checkpoint written yet)"
        return f"{self.last_saved[0]} (step {self.last_saved[1]})"

    def write_cost(self) -> None:
        if self.dist.main:
            self.ledger.snapshot().save(self.run_dir)

    # ---- one step ----------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The method's loss terms on one batch (H-GKD: queue updated first, as in the paper)."""
        images, labels = self.method.prepare(batch.images, batch.labels)
        teacher = self.targets.outputs(batch, images) if self.method.teacher_needs else NetOutputs()
        x = normalize_uint8(images, self.mean, self.std)
        visible = None if self.supervised else batch.visible
        return self.ddp(x, visible, teacher, labels, batch.indices)

    def step(self, batch: Batch, stop: StopSignals | None = None) -> tuple[dict[str, float], str | None]:
        """One optimizer step unless a loss term or the gradient norm is not finite (issue 21):
        then nothing is applied (``--nonfinite skip``: buffers such as H-GKD's queue and the
        BatchNorm statistics are put back) or the run stops with one line. Returns the metrics
        row and the stop signal every rank agreed on (None: keep going)."""
        self.ddp.train()  # student + method only; a classifier teacher stays in eval mode
        skip = self.cfg.nonfinite == "skip"
        buffers = [(b, b.detach().clone()) for b in self.step_module.buffers()] if skip else []
        terms = self.losses(self.targets.complete(batch.to(self.device).ready()))
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.step_module.parameters(), self.cfg.clip_grad)
        nonfinite, stop_name, retries = self._agree(terms, grad_norm, stop, getattr(batch, "remote_retries", 0))
        self.remote_retries += retries
        row = {**{k: float(v.detach()) for k, v in terms.items()}, "grad_norm": float(grad_norm)}
        if nonfinite and not skip:
            values = ", ".join(f"{k}={row[k]}" for k in nonfinite)
            raise HgkdError(f"{self.run_dir}: non-finite loss at epoch {self.epoch} step {self.global_step + 1} "
                            f"({values}), not applied; last good checkpoint {self._last_saved_text()}; lower --lr, "
                            f"check the data, or skip such steps with --nonfinite skip")
        if nonfinite:
            for buffer, saved in buffers:
                buffer.copy_(saved)
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            log.warning("step %d: non-finite %s, skipped (%d so far)", self.global_step + 1, ", ".join(nonfinite),
                        self.skipped_steps)
        else:
            self.optimizer.step()
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        row.update(lr=self.optimizer.param_groups[0]["lr"], skipped_steps=self.skipped_steps,
                   remote_retries=self.remote_retries)
        return row, stop_name

    def _agree(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, stop: StopSignals | None,
               retries: int) -> tuple[list[str], str | None, int]:
        """What every rank decides together, in one all-reduce of a few integers: the loss terms
        (and ``grad_norm``) not finite on any rank, whether any rank was asked to stop, and the
        remote read retries of this step's batches summed over ranks."""
        names = [*terms, "grad_norm"]
        values = torch.stack([*(t.detach().float().reshape(()) for t in terms.values()),
                              grad_norm.detach().float().reshape(()).to(self.device)])
        local_stop = stop is not None and stop.requested is not None
        flags = torch.cat([(~torch.isfinite(values)).long(),
                           torch.tensor([int(local_stop), int(retries)], device=values.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(flags)  # SUM: > 0 means on some rank
        *bad, stops, retries_all = flags.tolist()
        stop_name = (stop.requested if local_stop else "a stop signal to another rank") if stops else None
        return [n for n, b in zip(names, bad) if b], stop_name, retries_all

    # ---- loop --------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        """One loader for the whole run: workers persist across epochs (the batch sampler
        runs in this process, so ``set_epoch`` still takes effect)."""
        if self._loader is None:
            # its own generator: creating an iterator (each epoch, and on resume) must not draw
            # from the global RNG that the step uses (CRD's negatives) and the checkpoint restores
            self._loader = DataLoader(self.dataset, sampler=self.sampler, batch_size=None,
                                      num_workers=self.cfg.workers, collate_fn=whole_batch,
                                      generator=torch.Generator().manual_seed(self.cfg.seed),
                                      pin_memory=self.device.type == "cuda",
                                      persistent_workers=self.cfg.workers > 0)
        return self._loader

    def fit(self, stop_after_steps: int | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.epochs`` (or for ``stop_after_steps`` steps); returns per-step metrics.

        SIGTERM/SIGUSR1 (issue 21): at the next step boundary, a checkpoint, then ``Resumable``.
        The run directory's lock is released when it returns (or raises)."""
        try:
            with stop_signals() as stop:
                return self._fit(stop, stop_after_steps)
        finally:
            self.lock.release()

    def _stop(self, signal_name: str) -> None:
        """Raise ``Resumable``: the checkpoint is written, the line says how to continue."""
        if self.dist.world_size > 1:  # no rank exits before rank 0 has written the checkpoint: torchrun
            dist.barrier()  # would otherwise kill rank 0 mid-write when the others exit 75
        how = "run the same command again" if self.resume_mode != "never" else \
            "run the same command with --resume auto"
        raise Resumable(f"{self.run_dir}: {signal_name} at epoch {self.epoch} step {self.global_step}; checkpoint "
                        f"{checkpoint_dir(self.run_dir) / LAST}; resumable: {how}")

    def _fit(self, stop: StopSignals, stop_after_steps: int | None) -> list[dict[str, float]]:
        make_dir(self.run_dir, "--out")
        self._take_lock()
        if self.started_fresh and checkpoints_present(self.run_dir):  # written since this trainer looked
            raise HgkdError(f"--out {self.run_dir} already holds a run; continue it with --resume auto or use a "
                            f"new --out")
        if self.dist.main:
            self.cfg.save(self.run_dir / "config.yaml")
        metrics = MetricsLog(self.run_dir, enabled=self.dist.main, after_step=self.global_step)
        history: list[dict[str, float]] = []
        steps_done, stopping = 0, None
        while self.epoch < self.cfg.epochs:
            self.sampler.set_epoch(self.epoch, self.next_batch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.next_batch, desc=f"epoch {self.epoch}",
                       disable=not self.dist.main or not self.cfg.log_every, leave=False)
            tick = time.perf_counter()
            for batch in self.loader():
                step_rows, forwards = self.sampler.global_batch(self.next_batch), self.targets.forwards
                try:
                    row, stopping = self.step(batch, stop)
                except HgkdError:
                    metrics.close()
                    raise
                world = self.dist.world_size
                self.ledger.add_step(step_rows, len(batch.rows) * world, (self.targets.forwards - forwards) * world)
                self.next_batch += 1
                row.update(epoch=self.epoch, step=self.global_step,
                           img_per_s=len(batch.rows) * self.dist.world_size / (time.perf_counter() - tick))
                tick = time.perf_counter()
                history.append(row)
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")
                bar.update(1)
                steps_done += 1
                saved = self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0
                if saved:
                    self.save()
                if stopping and self.next_batch < self.steps_per_epoch:  # at an epoch's end: below
                    bar.close()
                    if not saved:
                        self.save()
                    metrics.close()
                    self._stop(stopping)
                if stop_after_steps is not None and steps_done >= stop_after_steps:
                    bar.close()
                    metrics.close()
                    self.write_cost()
                    return history
            bar.close()
            self.epoch, self.next_batch = self.epoch + 1, 0
            self.save()
            if stopping and self.epoch < self.cfg.epochs:
                metrics.close()
                self._stop(stopping)
        metrics.close()
        self.write_cost()
        return history


def run_teacher_identity(cfg: DistillConfig, targets: Any) -> dict[str, Any] | None:
    """Which teacher's tokens the student learns (name, weights, grid); None for classifier teachers."""
    if getattr(targets, "cache", None) is not None:
        return teacher_identity(targets.cache.meta.teacher)
    if cfg.online_teacher:
        from ..extract.teachers import sha256_file

        ckpt = cfg.teacher_checkpoint
        return teacher_identity({"name": cfg.online_teacher, "checkpoint_sha256": sha256_file(ckpt) if ckpt else None,
                                 "init_seed": cfg.seed, "grid": list(targets.teacher.grid_size)})
    return None


def make_dir(path: Path, option: str) -> None:
    """``mkdir -p`` with a one-line user error (a file in the way, no permission, full disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HgkdError(f"{option} {path}: cannot create the directory ({err.strerror or err}); "
                        f"choose another {option}") from None


def _step_of(cell: str) -> float:
    """A CSV step cell as a number; a torn last line (killed mid-write) counts as after every step."""
    try:
        return float(cell)
    except ValueError:
        return float("inf")


class MetricsLog:
    """Per-step metrics to ``metrics.csv`` and, when installed, TensorBoard.

    ``after_step``: the step the run (re)starts from. Rows of later steps, logged by a
    process killed after its last checkpoint, are dropped from the CSV and purged from
    TensorBoard, so a resumed run logs every step once (issue 11).
    """

    FIELDS = ("epoch", "step", "loss", "lr", "grad_norm", "img_per_s", "skipped_steps", "remote_retries")

    def __init__(self, run_dir: Path, enabled: bool = True, after_step: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self._path = run_dir / "metrics.csv"
        self._file = None
        self._csv: csv.DictWriter | None = None
        self._drop_rows_after(after_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=after_step + 1)
        except ImportError:
            self._tb = None

    def _drop_rows_after(self, step: int) -> None:
        """Rewrite ``metrics.csv`` (atomically) without rows of steps after ``step``."""
        if not self._path.exists() or not self._path.stat().st_size:
            return
        with self._path.open(newline="") as f:
            rows = list(csv.reader(f))
        col = rows[0].index("step")
        kept = [rows[0], *(r for r in rows[1:] if len(r) == len(rows[0]) and _step_of(r[col]) <= step)]
        if len(kept) == len(rows):
            return
        tmp = self._path.with_name(".metrics.csv.tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, self._path)
        log.info("%s: dropped %d rows logged after step %d (the checkpoint)", self._path, len(rows) - len(kept), step)

    def _open(self, row: dict[str, float]) -> csv.DictWriter:
        """Columns: the fixed ones, then the method's loss terms (kept from an existing file)."""
        if self._path.exists() and self._path.stat().st_size:
            with self._path.open(newline="") as f:
                fields = next(csv.reader(f))
            self._file = self._path.open("a", newline="")
            return csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        fields = [*self.FIELDS[:3], *sorted(set(row) - set(self.FIELDS)), *self.FIELDS[3:]]
        self._file = self._path.open("w", newline="")
        writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        return writer

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._csv is None:
            self._csv = self._open(row)
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self._tb.add_scalar(f"train/{key}", value, int(row["step"]))

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._file.close()
            if self._tb is not None:
                self._tb.close()
