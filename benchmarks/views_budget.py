"""The views budget (issues 12, 22): run ``pipelines/views_budget.yaml`` and judge its claims.

``.venv/bin/python benchmarks/views_budget.py [--no-run] [--set section.key=value ...]`` runs the
pipeline (finished stages are reused), then writes ``benchmarks/results/views_budget.json`` -
everything in it is written here: the rows (mean ± std over seeds, per-seed values), each
cache's bytes per view, the sweep cost (``sweep_cost.json``), where and how long it ran - and
``views_budget.png`` (MLP top-1 against teacher forwards).

Goals are the pipeline file's ``claims``, named before the run (issue 22): the candidate variant
against the reference, paired by seed (seed s of both reads the same views: per-seed caches,
online twins). Per seed, ratio = candidate / reference on the claim's metric; the goal is met
when the lower end of the ratio's 95% confidence interval (Student t over the seeds) is >=
``min_ratio`` and the candidate spends <= ``max_cost`` of the reference's teacher forwards. No
row is picked after the run, and the test split picks nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import torch
from scipy import stats

from hgkd.pipelines.run import resolve_builtin, run_pipeline
from hgkd.pipelines.spec import PipelineSpec, load_spec
from hgkd.pipelines.sweep_cost import SWEEP_COST_FILE
from hgkd.storage.cache import FeatureCache

HERE = Path(__file__).parent
IMAGENET_TRAIN = 1_281_167
LIMITS = ("digits at 64 px (1,348 training images), a 0.6M-parameter MAE-pretrained ViT teacher and ResNet-18 "
          "students: it shows how many cached views this setting needs, not ImageNet's; 2-3 seeds give wide "
          "intervals, so an unmet claim may be a lack of power rather than a loss")


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: (float(v) if k not in ("variant", "run", "description") and v != "" else v)
                 for k, v in row.items()} for row in csv.DictReader(f)]


def judge(claim: dict, rows: list[dict], runs: list[dict], seeds: list[int]) -> dict:
    """One claim over its paired seeds: per-seed ratios, mean, sd, 95% t-interval, cost ratio."""
    metric = claim["metric"]
    by_run = {r["run"]: r for r in runs}
    pairs = [(by_run[f"{claim['candidate']}-s{s}"][metric], by_run[f"{claim['reference']}-s{s}"][metric]) for s in seeds]
    ratios = [c / r for c, r in pairs]
    mean = statistics.fmean(ratios)
    sd = statistics.stdev(ratios) if len(ratios) > 1 else float("nan")
    half = stats.t.ppf(0.975, len(ratios) - 1) * sd / math.sqrt(len(ratios)) if len(ratios) > 1 else float("inf")
    row = {r["variant"]: r for r in rows}
    cost = row[claim["candidate"]]["teacher_fwd"] / row[claim["reference"]]["teacher_fwd"]
    low = mean - half
    return {"value": mean, "goal": claim["min_ratio"], "better": "higher", "met": bool(low >= claim["min_ratio"] and cost <= claim["max_cost"]),
            "ci95": [low, mean + half], "sd": sd, "seeds": seeds, "per_seed_ratio": ratios,
            "per_seed": [{"seed": s, "candidate": c, "reference": r} for s, (c, r) in zip(seeds, pairs)],
            "teacher_fwd_ratio": cost, "max_cost": claim["max_cost"],
            "measure": f"{claim['candidate']} / {claim['reference']} {metric}, paired by seed; met: 95% CI low >= "
                       f"{claim['min_ratio']} and teacher forwards <= {claim['max_cost']} of the reference's"}


def not_run(claim: dict, globs: list[str]) -> dict:
    """A claim whose variants were left out of this run (``--variants``): written, not measured."""
    return {"value": None, "goal": claim["min_ratio"], "met": False, "max_cost": claim["max_cost"],
            "not_run": f"{claim['candidate']} / {claim['reference']} not run (--variants {' '.join(globs)})",
            "measure": f"{claim['candidate']} / {claim['reference']} {claim['metric']}, paired by seed"}


def cache_sizes(out_dir: Path) -> dict[str, dict]:
    """Bytes per stored view of every cache the sweep made (as ``hgkd-extract info`` reports it)."""
    out = {}
    for path in sorted((out_dir / "caches").glob("*.zarr")):
        cache = FeatureCache.open(str(path))
        out[path.stem] = {"views_per_image": int(cache.meta.view["views_per_image"]), "view_seed": cache.meta.view["seed"],
                          "teacher_view": cache.meta.view["teacher_view"], "views": cache.num_views,
                          "codec": cache.meta.storage["codec"], "bytes_per_view": cache.nbytes_stored() / cache.num_views,
                          "token_grid": cache.meta.teacher["grid"], "embed_dim": cache.meta.teacher["embed_dim"]}
    return out


def imagenet_storage() -> dict | None:
    """ImageNet-1k cache size per K, from the trained-feature ViT-L bytes per view of ``extract.json`` (P3)."""
    path = HERE / "results" / "extract.json"
    goals = json.loads(path.read_text()).get("goals", {}) if path.exists() else {}
    trained = goals.get("P3_trained_bytes_per_view_vit_l")
    if trained is None:
        return None
    per_view = trained["value"]
    return {"bytes_per_view": per_view, "source": "benchmarks/results/extract.json goal P3_trained_bytes_per_view_vit_l "
            "(trained features scaled to ViT-L 196x1024, int8ct)",
            **{f"k{k}_tb": per_view * k * IMAGENET_TRAIN / 1e12 for k in (1, 2, 4, 8)}}


def train_images(out_dir: Path) -> int | None:
    first = next((out_dir / "caches").glob("*.zarr"), None)
    return None if first is None else int(FeatureCache.open(str(first)).meta.dataset["num_samples"])


def where() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0], "gpu": gpu,
            "loadavg_1_5_15_end": os.getloadavg()}


def run_or_collect(description: str, pipeline: str) -> tuple[argparse.Namespace, PipelineSpec, float | None]:
    """A benchmark over a pipeline file (also ``sweep_cost.py``): parse ``--pipeline``, ``--set``
    and ``--no-run``, then run the pipeline (finished stages reused) or only resolve its data.
    Returns the options, the spec and the run's wall seconds (None with ``--no-run``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--pipeline", default=pipeline)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--no-run", action="store_true", help="only collect the results of a finished run")
    ap.add_argument("--variants", action="append", default=[], metavar="GLOB",
                    help="run only the variants whose name matches (repeatable; default: all); a claim whose "
                         "variants did not run is written as not measured")
    args = ap.parse_args()
    spec = load_spec(args.pipeline, args.overrides)
    if args.variants:
        spec.variants = [v for v in spec.variants if any(fnmatch(v["name"], glob) for glob in args.variants)]
        if not spec.variants:
            sys.exit(f"--variants {args.variants}: no variant of {args.pipeline} matches")
    start = time.perf_counter()
    if args.no_run:
        resolve_builtin(spec)
        return args, spec, None
    run_pipeline(spec)
    return args, spec, time.perf_counter() - start


def main() -> None:
    args, spec, wall = run_or_collect(__doc__, str(HERE.parent / "pipelines" / "views_budget.yaml"))
    if not spec.claims:
        sys.exit(f"{args.pipeline}: no claims named: nothing to judge")
    out_dir = spec.out_dir
    rows, runs = read_csv(out_dir / "results.csv"), read_csv(out_dir / "results_runs.csv")
    for row in rows:
        row["per_seed"] = {r["run"]: {k: r.get(k) for k in ("knn_top1", "mlp_top1", "fidelity_cos")}
                           for r in runs if r["variant"] == row["variant"]}
    seeds = {v["name"]: v.get("seeds") or [v.get("seed", 0)] for v in spec.variants}
    claims = {c["name"]: judge(c, rows, runs, seeds[c["candidate"]]) if {c["candidate"], c["reference"]} <= set(seeds)
              else not_run(c, args.variants) for c in spec.claims}
    sweep = json.loads((out_dir / SWEEP_COST_FILE).read_text())
    result = {
        "where": where(), "pipeline": args.pipeline, "overrides": args.overrides,
        "wall_seconds": wall, "collected_only": args.no_run, "variants_run": sorted(seeds),
        "claims_named_before_the_run": spec.claims, "limits": LIMITS,
        "train_images": train_images(out_dir),
        "rows": rows, "caches": cache_sizes(out_dir), "sweep_cost": sweep,
        "imagenet1k_storage_vit_large_int8ct": imagenet_storage(), "imagenet1k_images": IMAGENET_TRAIN,
        "goals": claims,
    }
    out = HERE / "results" / "views_budget.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    if (out_dir / "frontier.png").exists():
        shutil.copyfile(out_dir / "frontier.png", HERE / "results" / "views_budget.png")
    for name, goal in claims.items():
        if goal["value"] is None:
            print(f"{name}: {goal['not_run']} -> NOT measured")
            continue
        print(f"{name}: {goal['measure']}: {goal['value']:.4f} (95% CI {goal['ci95'][0]:.4f}-{goal['ci95'][1]:.4f}), "
              f"{100 * goal['teacher_fwd_ratio']:.1f}% of the forwards -> {'met' if goal['met'] else 'NOT met'}")
    print(f"sweep: P7 = {sweep['p7']}; wrote {out}")


if __name__ == "__main__":
    main()
