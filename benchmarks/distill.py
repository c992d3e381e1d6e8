"""P2/P4/P5: distillation step from the cache vs student-only vs online teacher; the sparse
student's forward+backward vs the plain dense timm ResNet; the memory queue's share of a step.

Run: ``.venv/bin/python benchmarks/distill.py [--quick] [--profile] [--only p2|p4|profile]``. Every
comparison is measured in one run, arms interleaved, best (P4) or median (P2) of repeats, so
ratios hold on a shared machine. Writes ``benchmarks/results/distill.json`` (``--quick``:
only to ``--out``). The same script runs on CUDA unchanged: ``--device auto`` picks the GPU,
the student runs under bf16 autocast there, and every timing synchronises the device.

- P2: a training step (H-GKD, masked backend) fed from the cache through the DataLoader vs
  the same step on batches held in memory (goal >= 0.95), and vs a live CAE-L teacher; data:
  ImageNet-like synthetic JPEGs (``reader.write_photo_shards``).
- P4 (issue 13): encoder forward+backward at mask ratio 0.6 for each student, batch and mask
  granularity, per sparse backend (``masked``, ``rows``, and ``minkowski`` where it is installed: on CUDA with a CUDA build),
  over the plain dense timm ResNet (``timm.create_model``, same memory format and precision;
  its time does not depend on the mask, so it is measured once per batch and shared by the
  granularities). Goals: masked <= 1.05x dense for each student; the best sparse backend
  <= 1.0x dense at ResNet-50 (stretch 0.7x). A goal's value is its worst configuration.
- P5: push + L_sim forward/backward against a full 50k x 1024 queue, as a share of a step
  (goal <= 5%, chosen here: issue 6 measured 3%).
- ``--profile``: torch.profiler self time of one forward+backward per student and arm,
  grouped by op kind (conv, BN, masking/elementwise, gather/scatter, ME, ...); and the
  MinkowskiEngine coordinate work (a forward that builds every coordinate and kernel map
  minus one that finds them cached in the same coordinate manager).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reader import write_photo_shards  # noqa: E402  (benchmarks/ is not a package)

from torch.utils.data import DataLoader  # noqa: E402

from hgkd.distill.config import DistillConfig  # noqa: E402
from hgkd.distill.data import CacheViewDataset, whole_batch  # noqa: E402
from hgkd.distill.losses import similarity_loss  # noqa: E402
from hgkd.distill.queue import MemoryQueue  # noqa: E402
from hgkd.distill.students import create_encoder  # noqa: E402
from hgkd.distill.students.minkowski import MinkowskiOps  # noqa: E402
from hgkd.distill.students.sparse_ops import run_resnet, upsample_visible  # noqa: E402
from hgkd.distill.train import Trainer  # noqa: E402
from hgkd.extract.run import ExtractConfig, autocast_dtype, resolve_device, run_extract  # noqa: E402
from hgkd.data.views import ViewConfig, sample_mask, view_rng  # noqa: E402

MASK_RATIO = 0.6
P4_MASKED_GOAL, P4_BEST_GOAL, P4_STRETCH, P2_GOAL, P5_GOAL = 1.05, 1.0, 0.7, 0.95, 0.05
SPARSE_ARMS = ("masked", "rows", "minkowski")


# ------------------------------------------------------------------ timing helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed(fn: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    return statistics.median(seconds_of(fn, device) for _ in range(repeats))


# ------------------------------------------------------------------ P4: student fwd+bwd
def visible_grid(batch: int, img: int, granularity: int, seed: int = 0) -> torch.Tensor:
    """(B, img/16, img/16) True = visible: exactly round(0.6 * cells) hidden cells of
    ``granularity`` px per image, drawn as the extractor draws them."""
    cfg = ViewConfig(img_size=img, mask_ratio=MASK_RATIO, mask_granularity=granularity)
    return torch.from_numpy(~np.stack([sample_mask(view_rng(seed, f"p4/{b}", 0), cfg) for b in range(batch)]))


def p4_arm_fns(student: str, batch: int, img: int, granularities: list[int], arms: list[str],
               device: torch.device, amp: torch.dtype | None, channels_last: bool) -> dict[str, Callable[[], None]]:
    """One forward+backward closure per arm: ``dense`` (timm) and ``<backend>@<granularity>``."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(0))
    images = images.to(device).contiguous(memory_format=memory_format)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext

    def step(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = forward()
            loss.backward()
        return run

    torch.manual_seed(0)
    dense = timm.create_model(student, num_classes=0, global_pool="").to(device, memory_format=memory_format)
    fns = {"dense": step(dense, lambda: dense(images).float().square().mean())}
    for backend in arms:  # "masked-compiled": the masked backend with compile_bn=True
        encoder = create_encoder(student, backend=backend.removesuffix("-compiled"), compile_bn=backend.endswith("-compiled"))
        encoder = encoder.to(device, memory_format=memory_format)
        for g in granularities:
            visible = visible_grid(batch, img, g).to(device)
            fns[f"{backend}@{g}"] = step(encoder, lambda e=encoder, v=visible: sum(
                f.float().square().mean() for f, _ in e(images, v)))
    return fns


def p4_measure(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> list[dict]:
    """Rows of (student, batch, arm, granularity, best seconds, ratio to dense), arms interleaved."""
    rows = []
    for student in args.students:
        for batch in args.batches:
            arms = [a for a in args.arms if a != "minkowski" or device.type != "cpu" or batch <= args.me_max_batch]
            fns = p4_arm_fns(student, batch, args.img, args.granularities, arms, device, amp, args.channels_last)
            for _ in range(args.warmup):
                for fn in fns.values():
                    fn()
            runs: dict[str, list[float]] = {name: [] for name in fns}
            names = list(fns)
            for r in range(args.rounds):  # interleaved, and the order rotates: no arm always runs first
                for name in names[r % len(names):] + names[: r % len(names)]:
                    runs[name].append(seconds_of(fns[name], device))
            best = {name: min(v) for name, v in runs.items()}
            for name, seconds in best.items():
                backend, _, gran = name.partition("@")
                rows.append({"student": student, "batch": batch, "arm": backend,
                             "granularity": int(gran) if gran else None, "seconds": seconds,
                             "ratio_vs_dense": seconds / best["dense"], "runs": runs[name]})
                print(f"P4 {student} b{batch} {name:<14} {seconds * 1000:9.1f} ms  {seconds / best['dense']:.3f}x dense",
                      flush=True)
            del fns
    return rows


def p4_goals(rows: list[dict]) -> dict:
    """Masked <= 1.05x dense per student; best sparse <= 1.0x at ResNet-50; worst configuration."""
    goals = {}
    students = sorted({r["student"] for r in rows})
    for student, arm in ((s, a) for s in students for a in ("masked", "masked-compiled")):
        masked = [r for r in rows if r["student"] == student and r["arm"] == arm]
        if masked:
            worst = max(masked, key=lambda r: r["ratio_vs_dense"])
            goals[f"P4_{arm.replace('-', '_')}_vs_dense_{student}"] = {
                "value": worst["ratio_vs_dense"], "goal": P4_MASKED_GOAL, "met": worst["ratio_vs_dense"] <= P4_MASKED_GOAL,
                "better": "lower", "worst_config": {"batch": worst["batch"], "granularity": worst["granularity"]},
                "measure": f"{arm} backend encoder fwd+bwd / plain dense timm ResNet, mask 0.6, worst batch x granularity"}
    for student in [s for s in students if s == "resnet50"] or students[-1:]:
        configs = {(r["batch"], r["granularity"]) for r in rows if r["student"] == student and r["arm"] != "dense"}
        best = []
        for batch, gran in sorted(configs):
            arms = [r for r in rows if r["student"] == student and r["batch"] == batch and r["granularity"] == gran]
            best.append(min(arms, key=lambda r: r["ratio_vs_dense"]))
        if best:
            worst = max(best, key=lambda r: r["ratio_vs_dense"])
            value = worst["ratio_vs_dense"]
            goals[f"P4_best_sparse_vs_dense_{student}"] = {
                "value": value, "goal": P4_BEST_GOAL, "met": value <= P4_BEST_GOAL, "better": "lower",
                "stretch": P4_STRETCH, "stretch_met": value <= P4_STRETCH,
                "best_arm_per_config": {f"b{r['batch']}@{r['granularity']}px": r["arm"] for r in best},
                "measure": "fastest sparse backend's encoder fwd+bwd / plain dense timm ResNet, worst batch x granularity"}
    return goals


# ------------------------------------------------------------------ profile (issue 13, item 1)
OP_KINDS = (  # (kind, substrings of aten/ME op names), first match wins
    ("ME convolution", ("MinkowskiConvolution",)),
    ("ME pooling", ("MinkowskiLocalPooling",)),
    ("conv (dense kernels)", ("convolution", "conv2d")),
    ("1x1 conv as matmul", ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")),
    ("BN (native kernel)", ("native_batch_norm",)),
    ("BN statistics (reductions)", ("aten::sum", "aten::mean", "vector_norm", "var_mean", "aten::rsqrt")),
    ("mask multiply / BN affine", ("aten::mul", "aten::addcmul", "aten::where", "masked_fill", "aten::div",
                                   "aten::sub", "aten::neg", "aten::lerp", "aten::pow")),
    ("ReLU", ("relu", "clamp_min", "threshold_backward")),
    ("residual add / grad accumulation", ("aten::add",)),
    ("gather / scatter rows", ("index_select", "index_copy", "scatter", "aten::index", "nonzero", "aten::cat")),
    ("max-pool", ("max_pool",)),
    ("allocation / copies", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::empty", "aten::new_", "aten::to")),
)


def op_kind(name: str) -> str:
    return next((kind for kind, keys in OP_KINDS if any(k in name for k in keys)), "other")


def profile_arms(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict:
    """Self time per op kind of one fwd+bwd per student and arm (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for student in args.students:
        batch, gran = args.batches[0], args.granularities[0]
        arms = list(args.arms)
        fns = p4_arm_fns(student, batch, args.img, [gran], arms, device, amp, args.channels_last)
        for name, fn in fns.items():
            fn()
            with profile(activities=activities) as prof:
                fn()
                sync(device)
            kinds: dict[str, float] = {}
            top = []
            for event in prof.key_averages():
                self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
                kinds[op_kind(event.key)] = kinds.get(op_kind(event.key), 0.0) + self_us / 1e6
                top.append((self_us / 1e6, event.key, event.count))
            total = sum(kinds.values())
            out[f"{student}/{name}"] = {
                "total_s": total, "by_kind_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
                "top_ops": [{"op": key, "self_s": s, "calls": n} for s, key, n in sorted(top, reverse=True)[:10]]}
            print_profile(f"{student} b{batch} {name}", out[f"{student}/{name}"])
        if "minkowski" in arms:
            out[f"{student}/minkowski_coordinate_work_s"] = minkowski_coordinate_work(student, batch, args.img, gran)
            print(f"  {student} ME coordinate + kernel map building: "
                  f"{out[f'{student}/minkowski_coordinate_work_s']:.3f} s per forward")
    return out


def minkowski_coordinate_work(student: str, batch: int, img: int, gran: int) -> float:
    """Forward seconds with a fresh coordinate manager minus with every map already cached."""
    encoder = create_encoder(student, backend="minkowski").eval()
    images = torch.randn(batch, 3, img, img)
    visible = upsample_visible(visible_grid(batch, img, gran), (img, img))
    best_fresh, best_cached = float("inf"), float("inf")
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            ops, x = MinkowskiOps.from_pixels(images, visible)
            run_resnet(encoder.body, ops, x)
            best_fresh = min(best_fresh, time.perf_counter() - start)
            start = time.perf_counter()
            run_resnet(encoder.body, ops, x)  # same manager: coordinate and kernel maps are cached
            best_cached = min(best_cached, time.perf_counter() - start)
    return best_fresh - best_cached


def print_profile(title: str, row: dict) -> None:
    print(f"\nprofile {title}: {row['total_s']:.3f} s self time")
    for kind, seconds in row["by_kind_s"].items():
        print(f"  {kind:<36}{seconds:9.3f} s {100 * seconds / row['total_s']:5.1f}%")


# ------------------------------------------------------------------ P2 and P5
class CycledBatches(torch.utils.data.Sampler):
    """The first epoch's batches of rows, over and over: a loader in steady state (no epoch
    restarts: with few photos an epoch is a handful of steps, a real one thousands)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return itertools.cycle(self.batches)


def steady_loader(dataset, batches: list[list[int]], workers: int, device: torch.device):
    """The trainer's loader settings (workers, whole batches, pinned memory) over ``CycledBatches``."""
    return iter(DataLoader(dataset, sampler=CycledBatches(batches), batch_size=None, num_workers=workers,
                           collate_fn=whole_batch, pin_memory=device.type == "cuda", persistent_workers=workers > 0))


def step_throughputs(trainer: Trainer, online: Trainer | None, steps: int, repeats: int,
                     decoders: list[str], workers: int) -> dict[str, float]:
    """img/s of a training step: batches ready on the device (student only), fed by the loader
    from the cache with each decoder (pixels made in the workers, or on the device), and with a
    live teacher. Loader arms run in steady state: each starts by draining what its workers
    prefetched, then times at least 2 x workers steps, so a full prefetch queue cannot flatter it."""
    device = trainer.device
    trainer.sampler.set_epoch(0)
    rows = [list(r) for r in trainer.sampler]
    # ready on the device: the student-only arm excludes every loader cost (decode, render, token decode)
    batches = [trainer.dataset[r].to(device).ready() for r in rows[:steps]]
    n_images = sum(len(b.rows) for b in batches)
    timed_steps = max(steps, 2 * workers)
    loaders = {}
    for decoder in decoders:
        dataset = CacheViewDataset(trainer.cfg.cache, trainer.cfg.data, decoder=decoder)
        loaders[decoder] = steady_loader(dataset, rows, workers, device)
        for _ in range(2 * workers + 1):  # workers started and their prefetch drained
            trainer.step(next(loaders[decoder]))

    def in_memory() -> None:
        for batch in batches:
            trainer.step(batch)

    def from_cache(decoder: str) -> int:
        images = 0
        for _ in range(timed_steps):
            batch = next(loaders[decoder])
            trainer.step(batch)
            images += len(batch.rows)
        return images

    def live_teacher() -> None:
        for batch in batches:
            online.step(batch)

    arms = {"student_only": (in_memory, n_images)}
    arms.update({f"from_cache_{d}": (lambda d=d: from_cache(d), timed_steps * len(rows[0])) for d in decoders})
    if online is not None:
        arms["online_teacher"] = (live_teacher, n_images)
    if device.type == "cuda":  # warm-up (cudnn autotuning, allocator)
        in_memory()
        if online is not None:
            live_teacher()
    results: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved repeats
        for name, (fn, images) in arms.items():
            results[name].append(images / seconds_of(fn, device))
    return {name: statistics.median(v) for name, v in results.items()}


def queue_share(dim: int, batch: int, step_seconds: float, device: torch.device, length: int = 50_000) -> dict:
    """Seconds of push + L_sim (fwd+bwd) against a full 50k queue, and its share of a step."""
    queue = MemoryQueue(length, dim).to(device)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, dim, device=device), dim=-1)  # noqa: E731
    queue.push(unit(length))
    teacher = unit(batch)
    student = torch.randn(batch, dim, device=device, requires_grad=True)

    def sim_step() -> None:
        queue.push(teacher)
        similarity_loss(teacher, student, queue.contents(), 0.009).backward()

    seconds = timed(sim_step, device)
    return {"queue_seconds": seconds, "step_seconds": step_seconds, "share": seconds / step_seconds}


def p2_p5(args: argparse.Namespace, device: torch.device) -> dict:
    """Extract a cache of the photos with the teacher, then P2's step arms and P5's queue."""
    decoders = [d for d in args.p2_decoders if d != "nvjpeg" or device.type == "cuda"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_photo_shards(tmp / "data", args.photos)
        cache = str(tmp / "cache.zarr")
        run_extract(ExtractConfig(data=[data], out=cache, teacher=args.teacher, device=str(device),
                                  view=ViewConfig(img_size=args.img, views_per_image=2),
                                  shard_views=64, batch_size=min(64, args.p2_batch), progress=False))
        # the nvjpeg arm reads this pil cache with another decoder: allowed here, only its speed is measured
        common = dict(data=[data], student=args.p2_student, sparse_backend=args.p2_backend, batch_size=args.p2_batch,
                      epochs=1, warmup_epochs=0, queue_size=50_000, workers=args.workers, log_every=0,
                      img_size=args.img, device=str(device))
        trainer = Trainer(DistillConfig(cache=cache, out=str(tmp / "run"), **common))
        online = Trainer(DistillConfig(online_teacher=args.teacher, out=str(tmp / "online"), **common)) \
            if args.online else None
        steps = step_throughputs(trainer, online, args.steps, args.p2_repeats, decoders, args.workers)
        queue = queue_share(1024, args.p2_batch, args.p2_batch / steps["student_only"], device)
    goals = {}
    for decoder in decoders:
        ratio = steps[f"from_cache_{decoder}"] / steps["student_only"]
        binds = "loader (reads + decode + render)" if ratio < args.p2_goal else "the student step on the device"
        goals[f"P2_cache_{decoder}_vs_student_only"] = {
            "value": ratio, "goal": args.p2_goal, "met": ratio >= args.p2_goal, "binds": binds,
            "measure": f"{args.p2_student} H-GKD step ({trainer.backend_choice.name} backend), batch {args.p2_batch}, "
                       f"{args.workers} loader workers, decoder {decoder}, steady state / batches ready on the device"}
        print(f"P2 {decoder}: cache/student-only {ratio:.3f} (goal >= {args.p2_goal}); binds: {binds}")
    print("P2 step img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    print(f"P5 queue 50k x 1024 push + L_sim fwd/bwd: {queue['queue_seconds'] * 1000:.1f} ms = "
          f"{100 * queue['share']:.1f}% of a step (goal <= {100 * P5_GOAL:.0f}%)")
    goals["P5_queue_share_of_step"] = {"value": queue["share"], "goal": P5_GOAL, "met": queue["share"] <= P5_GOAL,
                                       "better": "lower",
                                       "measure": "50k x 1024 queue push + L_sim fwd/bwd / student-only step"}
    return {"teacher": args.teacher, "student": args.p2_student, "backend": trainer.backend_choice.name,
            "batch": args.p2_batch, "workers": args.workers, "photos": args.photos, "decoders": decoders,
            "step_img_per_s": steps, "queue": queue, "goals": goals}


# ------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    names = lambda s: s.split(",")  # noqa: E731
    ap.add_argument("--quick", action="store_true", help="shrink every size: checks the script, not the goals")
    ap.add_argument("--only", choices=["all", "p4", "p2", "profile"], default="all")
    ap.add_argument("--profile", action="store_true", help="also profile one fwd+bwd per student and arm")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: all cores)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    ap.add_argument("--students", type=names, default=["resnet18", "resnet50"])
    ap.add_argument("--batches", type=ints, default=[8, 32])
    ap.add_argument("--granularities", type=ints, default=[16, 32])
    ap.add_argument("--arms", type=names, default=list(SPARSE_ARMS), help=f"of {SPARSE_ARMS + ('masked-compiled',)}")
    ap.add_argument("--me-max-batch", type=int, default=8, help="MinkowskiEngine on the CPU (single-threaded) up to this batch")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=2, help="P4 interleaved rounds (best of)")
    ap.add_argument("--warmup", type=int, help="P4 untimed rounds first (default 0 on CPU, 2 on CUDA)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--teacher", default="cae_large_patch16")
    ap.add_argument("--p2-student", default="resnet50")
    ap.add_argument("--p2-batch", type=int, default=8)
    ap.add_argument("--photos", type=int, help="ImageNet-like JPEGs behind P2's cache (default 4 x batch)")
    ap.add_argument("--p2-goal", type=float, default=P2_GOAL, help="P2 goal (issue 20 sets 0.9 on a GPU)")
    ap.add_argument("--p2-decoders", type=names, default=["pil", "nvjpeg"], help="loader arms (nvjpeg: CUDA only)")
    ap.add_argument("--p2-backend", default="auto", help="sparse backend of P2's student (auto: the device's fastest)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--p2-repeats", type=int, default=2)
    ap.add_argument("--no-online", dest="online", action="store_false", help="skip P2's live-teacher arm")
    ap.add_argument("--out", help="JSON to write (default benchmarks/results/distill.json; --quick: only --out)")
    args = ap.parse_args()
    if args.quick:
        args.students, args.batches, args.img, args.rounds, args.warmup = ["resnet18"], [2], 64, 1, 1
        args.teacher, args.p2_student, args.p2_batch, args.steps, args.p2_repeats = \
            "cae_tiny_patch16", "resnet18", 4, 2, 1
    args.photos = args.photos or max(16, 4 * args.p2_batch)  # a few batches of distinct images; arms cycle them
    return args


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    amp = autocast_dtype(args.precision, device)
    if args.warmup is None:
        args.warmup = 2 if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "loadavg_1_5_15_before": os.getloadavg()},
              "threads": torch.get_num_threads(), "precision": str(amp or torch.float32),
              "channels_last": args.channels_last, "goals": {}}
    if args.only in ("all", "p2"):
        p2 = p2_p5(args, device)
        result["goals"].update(p2.pop("goals"))
        result["p2_p5"] = p2
    if args.only in ("all", "p4"):
        rows = p4_measure(args, device, amp)
        result["p4"] = {"img_size": args.img, "mask_ratio": MASK_RATIO, "rounds": args.rounds, "warmup": args.warmup,
                        "rows": rows, "timing": "best of interleaved rounds, device synchronised"}
        result["goals"].update(p4_goals(rows))
    if args.profile or args.only == "profile":
        result["profile"] = profile_arms(args, device, amp)
    result["machine"]["loadavg_1_5_15_after"] = os.getloadavg()
    print(f"\n{'goal':<46}{'value':>10}{'goal':>8}  met")
    for name, row in result["goals"].items():
        print(f"{name:<46}{row['value']:>10.3f}{row['goal']:>8}  {'yes' if row['met'] else 'NO'}")
    out = args.out or (None if args.quick else str(Path(__file__).parent / "results" / "distill.json"))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
