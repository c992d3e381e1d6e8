"""Detection transfer on the embedded digit set (issue 19): H-GKD student vs scratch, box and mask AP.

Run: ``.venv/bin/python benchmarks/detection.py [--student demo-out/runs/hgkd/student.safetensors]
[--seeds 0 1 2] [--quick]``. The student is the demo's H-GKD ResNet-18 (``make demo`` writes it);
each (trunk, seed) is one ``hgkd-evaluate detection`` run in a fresh child process with the
``digits`` recipe (Mask R-CNN + FPN, trained BN, 4 epochs of 256 canvases; scored by COCOeval
on 64 val canvases from held-out scans), the child's torch threads = the machine's cores.
Goals:
- ``box_ap_hgkd_minus_scratch``: the student's box AP minus scratch's, paired by seed, mean > 0;
- ``mask_ap_hgkd_minus_scratch``: the same for mask AP;
- ``demo_budget``: one fine-tune + scoring (the slower trunk's mean wall time) <= 150 s, so
  that the demo's two trunks add at most 5 minutes to it (the demo stays <= 20 on 2 idle cores).
Training images/s are reported per run. Writes ``benchmarks/results/detection.json`` with every
goal in ``goals`` (``--quick``: 1 epoch, one seed, writes nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "detection.json"
STUDENT = ROOT / "demo-out" / "runs" / "hgkd" / "student.safetensors"
BUDGET_S = 150.0


def run(model: str, seed: int, out: Path, epochs: int | None) -> dict:
    """One ``hgkd-evaluate detection`` child on the embedded set; its record plus its wall time."""
    cmd = [str(Path(sys.executable).parent / "hgkd-evaluate"), "detection", "--model", model, "--recipe", "digits",
           "--seed", str(seed), "--workers", "1", "--no-progress", "--out", str(out),
           *(["--epochs", str(epochs)] if epochs else [])]
    begin = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    record = json.loads(out.read_text())
    return {"trunk": model, "seed": seed, "box_ap": record["bbox"]["AP"], "mask_ap": record["segm"]["AP"],
            "bbox": record["bbox"], "segm": record["segm"], "train_images_per_s": record["train_images_per_s"],
            "final_loss": record["final_loss"], "wall_s": time.perf_counter() - begin}


def summary(rows: list[dict]) -> dict:
    def stats(key: str) -> dict:
        values = [r[key] for r in rows]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    return {key: stats(key) for key in ("box_ap", "mask_ap", "train_images_per_s", "wall_s")}


def paired(rows: list[dict], key: str, seeds: list[int]) -> dict:
    """The student's lead over scratch in ``key``, paired by seed (same canvases, same order, same
    head initialisation): mean of the per-seed differences, their std; met when the mean is > 0."""
    by_seed = {(r["name"], r["seed"]): r[key] for r in rows}
    diffs = [by_seed["hgkd", s] - by_seed["scratch", s] for s in seeds]
    mean = statistics.fmean(diffs)
    return {"value": mean, "goal": 0.0, "met": mean > 0, "per_seed": diffs,
            "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "hgkd_mean": statistics.fmean(by_seed["hgkd", s] for s in seeds),
            "scratch_mean": statistics.fmean(by_seed["scratch", s] for s in seeds),
            "measure": f"H-GKD student minus scratch ResNet-18, {key} (AP points), paired by seed, mean of "
                       f"{len(seeds)} seeds; the seed moves AP by more than the lead, so it shows the sign, not its size"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=str(STUDENT), help="the H-GKD student (exported .safetensors or run dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="1 epoch, first seed only, writes nothing")
    args = parser.parse_args()
    if not Path(args.student).exists():
        raise SystemExit(f"{args.student}: no H-GKD student; run `make demo` first (it writes demo-out/)")
    seeds = args.seeds[:1] if args.quick else args.seeds
    trunks = {"hgkd": args.student, "scratch": "scratch:resnet18"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hgkd-bench-det-") as tmp:
        for seed in seeds:
            for name, model in trunks.items():
                row = run(model, seed, Path(tmp) / f"{name}-s{seed}.json", 1 if args.quick else None)
                rows.append({"name": name, **row})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("bbox", "segm")}), flush=True)
    by = {name: summary([r for r in rows if r["name"] == name]) for name in trunks}
    slower = max(by[n]["wall_s"]["mean"] for n in trunks)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},
        "setting": "hgkd-evaluate detection --recipe digits (Mask R-CNN, FPN 64 wide, trained BN, 4 epochs x 32 "
                   "steps of 8 canvases, 128 px; COCOeval on 64 val canvases); student = the demo's H-GKD ResNet-18",
        "student": args.student, "seeds": seeds, "runs": rows, "summary": by,
        "goals": {
            **{f"{key}_hgkd_minus_scratch": paired(rows, key, seeds) for key in ("box_ap", "mask_ap")},
            "demo_budget": {"goal": BUDGET_S, "value": slower, "unit": "s per trunk (fine-tune + scoring)",
                            "met": slower <= BUDGET_S, "better": "lower",
                            "measure": "the slower trunk's mean wall seconds of one fine-tune + scoring"},
        },
    }
    print(json.dumps(result["goals"], indent=1))
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
