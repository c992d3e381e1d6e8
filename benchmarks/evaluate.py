"""Streaming evaluation (issue 15): memory and speed of a probe, side by side in one run.

Run: ``.venv/bin/python benchmarks/evaluate.py [--quick]``.
Synthetic labelled images: 32x32 JPEGs (small on purpose, to keep the run to minutes on 2
cores), 10 classes (a class colour plus pixel noise), in webdataset tars of 1,000 samples.
Each arm is one ``hgkd.evaluate.run_task("mlp", "scratch:resnet18", tars, test_fraction=0.2,
img_size=32, workers=1, memory_mb=4)`` in a fresh child process with a fresh feature cache:
the images are read and decoded per batch by one DataLoader worker, their frozen features
written to the Zarr feature cache, and the MLP probe trained from it. ``memory_mb=4``: the
20,000-image probe's 16,000 x 512 train features (31 MiB) are read from the cache in
shuffled blocks every epoch; the 2,000-image probe's (3 MiB) are loaded whole.
The child reports its peak RSS (``VmHWM`` of /proc/self/status) and its loader worker's
(``RUSAGE_CHILDREN``); it runs one intra-op thread, as on a shared 2-core machine.
Goals:
- ``rss_20k_vs_2k``: peak RSS of the probe on 20,000 images / on 2,000 <= 1.2;
- ``probe_epoch_speedup``: one epoch from images (decode + resize + backbone forward over the
  training images, measured as the feature pass's time per image x training images) / one
  probe epoch from the feature cache (blocks read, shuffled, head trained) >= 20, on the
  20,000-image arm. The head's own step is left out of the image epoch, which favours images.
Writes ``benchmarks/results/evaluate.json`` with a ``goals`` object (``--quick``: 5,000 vs 500
images, 3 epochs, writes nothing).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "evaluate.json"
PER_SHARD = 1000
SIZE = 32
MEMORY_MB = 4.0
RSS_GOAL, SPEED_GOAL = 1.2, 20.0


def write_tars(out: Path, n: int, seed: int = 0) -> str:
    """``n`` labelled 32x32 JPEGs (10 classes: colour + noise) in tars of 1,000."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (10, 3))
    out.mkdir(parents=True, exist_ok=True)
    shards = -(-n // PER_SHARD)
    for s in range(shards):
        with wds.TarWriter(str(out / f"synth-{s:04d}.tar")) as sink:
            for i in range(s * PER_SHARD, min(n, (s + 1) * PER_SHARD)):
                label = i % 10
                pixels = np.clip(colours[label] + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "cls": str(label)})
    return str(out / f"synth-{{0000..{shards - 1:04d}}}.tar")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(data: str, features_dir: str, epochs: int) -> None:
    """One probe in this process; prints its record plus peak RSS as JSON."""
    import torch

    from hgkd.evaluate import run_task

    torch.set_num_threads(1)
    record = run_task("mlp", "scratch:resnet18", data, test_fraction=0.2, img_size=SIZE, batch_size=128, workers=1,
                      features_dir=features_dir, memory_mb=MEMORY_MB, epochs=epochs)
    record["peak_rss_mb"] = vm_hwm_mb()
    record["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(record))


def run_arm(n: int, epochs: int, work: Path) -> dict:
    data = write_tars(work / f"data-{n}", n)
    cmd = [sys.executable, __file__, "--child", data, "--features-dir", str(work / f"features-{n}"),
           "--epochs", str(epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child for {n} images failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    n_images = record["n_train"] + record["n_test"]
    image_epoch = record["feature_seconds"] / n_images * record["n_train"]
    cache_epoch = record["train_seconds"] / record["epochs"]
    return {"images": n, "n_train": record["n_train"], "n_test": record["n_test"], "top1": record["top1"],
            "peak_rss_mb": record["peak_rss_mb"], "workers_peak_rss_mb": record["workers_peak_rss_mb"],
            "feature_seconds": record["feature_seconds"], "image_epoch_s": image_epoch,
            "cache_epoch_s": cache_epoch, "speedup": image_epoch / cache_epoch, "epochs": record["epochs"],
            "features_in_memory": record["n_train"] * 512 * 4 <= MEMORY_MB * 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5,000 vs 500 images, 3 epochs; writes nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--features-dir", help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.features_dir, args.epochs)
        return
    small, large = (500, 5000) if args.quick else (2000, 20000)
    epochs = 3 if args.quick else args.epochs
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hgkd-bench-eval-") as tmp:
        arms = [run_arm(n, epochs, Path(tmp)) for n in (small, large)]
    print(f"{'images':>8}{'peak RSS MB':>13}{'worker MB':>11}{'image epoch s':>15}{'cache epoch s':>15}"
          f"{'speedup':>9}{'top-1':>8}")
    for a in arms:
        print(f"{a['images']:>8}{a['peak_rss_mb']:>13.1f}{a['workers_peak_rss_mb']:>11.1f}{a['image_epoch_s']:>15.3f}"
              f"{a['cache_epoch_s']:>15.4f}{a['speedup']:>9.1f}{a['top1']:>8.2f}")
    rss_ratio = arms[1]["peak_rss_mb"] / arms[0]["peak_rss_mb"]
    speedup = arms[1]["speedup"]
    goals = {
        f"rss_{large // 1000}k_vs_{small // 1000 or small}{'k' if small >= 1000 else ''}": {
            "value": rss_ratio, "goal": RSS_GOAL, "met": rss_ratio <= RSS_GOAL, "better": "lower",
            "measure": f"peak RSS (VmHWM) of an MLP probe task on {large} vs {small} synthetic {SIZE}-px images, "
                       "child processes, feature extraction included"},
        "probe_epoch_speedup": {
            "value": speedup, "goal": SPEED_GOAL, "met": speedup >= SPEED_GOAL, "better": "higher",
            "measure": f"epoch from images (decode + resize + ResNet-18 forward) / probe epoch from the feature cache, "
                       f"{large} images"},
    }
    print(f"RSS ratio {rss_ratio:.3f} (goal <= {RSS_GOAL}); probe epoch speedup {speedup:.1f}x (goal >= {SPEED_GOAL})")
    if args.quick:
        return
    import torch
    import zarr

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "zarr": zarr.__version__, "numpy": np.__version__, "loadavg_1_5_15_before": before,
                          "loadavg_1_5_15_after": os.getloadavg()},
              "img_size": SIZE, "memory_mb": MEMORY_MB, "task": "mlp", "model": "scratch:resnet18", "workers": 1,
              "threads": 1, "arms": arms, "goals": goals}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
