"""P2/P4/P5: distillation step from the cache vs student-only vs online teacher; sparse
backends vs dense; memory-queue share of a step.

Run: ``.venv/bin/python benchmarks/distill.py [--quick]``. Every comparison is measured in
one run, arms interleaved, medians reported. Writes ``benchmarks/results/distill.json``.
Default: CAE-L teacher cache (1024 x 14 x 14 targets) of the bundled photos, ResNet-50
student, 224 px; ``--quick`` uses tiny models at 64 px (checks the script, not the goals).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hgkd.distill.config import DistillConfig
from hgkd.distill.losses import similarity_loss
from hgkd.distill.queue import MemoryQueue
from hgkd.distill.students import create_encoder
from hgkd.distill.train import Trainer
from hgkd.extract.demo_data import write_demo_shards
from hgkd.extract.run import ExtractConfig, run_extract
from hgkd.extract.views import ViewConfig


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_throughputs(trainer: Trainer, online: Trainer | None, steps: int) -> dict[str, float]:
    """img/s of a training step: targets in memory, read from the cache, from a live teacher."""
    batches = [trainer.dataset[rows] for rows, _ in zip(trainer.sampler, range(steps))]
    n_images = sum(len(b.rows) for b in batches)

    def in_memory() -> None:
        for batch in batches:
            trainer.step(batch)

    def epochs_forever():
        epoch = 0
        while True:
            trainer.sampler.set_epoch(epoch)
            yield from trainer.loader()
            epoch += 1

    stream = epochs_forever()
    next(stream)  # workers started and warm: steady state, as over a long run

    def from_cache() -> None:
        for batch, _ in zip(stream, range(steps)):
            trainer.step(batch)

    def live_teacher() -> None:
        for batch in batches:
            online.step(batch)

    arms = {"student_only": in_memory, "from_cache": from_cache}
    if online is not None:
        arms["online_teacher"] = live_teacher
    results: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(2):  # interleaved repeats
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            results[name].append(n_images / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in results.items()}


def backend_times(student: str, img: int, batch: int, grid: int) -> dict[str, float]:
    """Encoder forward+backward seconds per backend at mask ratios 0.6 and 0.75."""
    out = {}
    images = torch.randn(batch, 3, img, img)
    for ratio in (0.6, 0.75):
        g = torch.Generator().manual_seed(0)
        visible = torch.rand(batch, grid, grid, generator=g) >= ratio
        for backend in ("minkowski", "masked", "dense"):
            torch.manual_seed(0)
            enc = create_encoder(student, backend=backend)

            def fwd_bwd() -> None:
                feats = enc.forward_features(images, visible)
                sum(f.float().pow(2).mean() for f, _ in feats).backward()

            out[f"{backend}@{ratio}"] = timed(fwd_bwd, repeats=2)
    return out


def queue_share(dim: int, batch: int, step_seconds: float, length: int = 50_000) -> dict[str, float]:
    """Seconds of push + L_sim (fwd+bwd) against a full 50k queue, and its share of a step."""
    queue = MemoryQueue(length, dim)
    queue.push(torch.nn.functional.normalize(torch.randn(length, dim), dim=-1))
    teacher = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    student = torch.randn(batch, dim, requires_grad=True)

    def sim_step() -> None:
        queue.push(teacher)
        similarity_loss(teacher, student, queue.contents(), 0.009).backward()

    seconds = timed(sim_step)
    return {"queue_seconds": seconds, "step_seconds": step_seconds, "share": seconds / step_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill.json"))
    args = ap.parse_args()
    teacher, student, img, batch = (("cae_tiny_patch16", "resnet18", 64, 8) if args.quick
                                    else ("cae_large_patch16", "resnet50", 224, 8))
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_demo_shards(tmp / "data")
        cache = str(tmp / "cache.zarr")
        run_extract(ExtractConfig(data=[data], out=cache, teacher=teacher, view=ViewConfig(img_size=img, views_per_image=2),
                                  shard_views=16, batch_size=8, progress=False))
        common = dict(data=[data], student=student, sparse_backend="masked", batch_size=batch, epochs=1,
                      warmup_epochs=0, queue_size=50_000, workers=2, log_every=0, img_size=img)
        trainer = Trainer(DistillConfig(cache=cache, out=str(tmp / "run"), **common))
        online = None if args.quick else Trainer(DistillConfig(online_teacher=teacher, out=str(tmp / "online"), **common))
        steps = step_throughputs(trainer, online, args.steps)
        grid = img // 16
        backends = backend_times(student, img, 4 if not args.quick else 2, grid)
        queue = queue_share(1024, batch, batch / steps["student_only"])
    ratio = steps["from_cache"] / steps["student_only"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "teacher": teacher, "student": student, "img_size": img, "batch": batch,
        "step_img_per_s": steps, "encoder_fwd_bwd_seconds": backends, "queue": queue,
        "goals": {"P2_cache_vs_student_only": {"value": ratio, "goal": 0.95, "met": ratio >= 0.95}},
    }
    print("step img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
          + f"; cache/student-only {ratio:.3f} (goal >= 0.95)")
    for ratio_key in ("0.6", "0.75"):
        dense = backends[f"dense@{ratio_key}"]
        print(f"encoder fwd+bwd @ mask {ratio_key}: " + ", ".join(
            f"{b} {backends[f'{b}@{ratio_key}'] * 1000:.0f} ms ({backends[f'{b}@{ratio_key}'] / dense:.2f}x dense)"
            for b in ("minkowski", "masked", "dense")))
    print(f"queue 50k x 1024 push + L_sim fwd/bwd: {queue['queue_seconds'] * 1000:.1f} ms = "
          f"{100 * queue['share']:.1f}% of a step")
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
