"""One entry point for every benchmark: runs each script, then prints one table of goals.

``.venv/bin/python benchmarks/run_all.py [--quick]``. Each script measures its comparison
side by side in one run and writes ``benchmarks/results/<name>.json`` (``--quick`` checks the
scripts with tiny models and writes nothing). The same scripts run unchanged on a GPU
(``benchmarks/device_check.sh`` runs them there and writes ``gpu.json``, kept as
``gpu_run<N>.json``, one per run on a lent GPU; their goals are listed here too). Scaling
rows (1 vs 2 writer processes or loader workers; no goal, just the ratio) follow the goals.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ("extract", "distill", "reader", "sample_index", "evaluate")
# run on their own (they train for minutes to hours); their committed goals are listed too
LISTED = ("detection", "views_budget", "sweep_cost", "faults")  # faults.json: benchmarks/reliability.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    failed = []
    for name in SCRIPTS:
        print(f"== benchmarks/{name}.py", flush=True)
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else [])]
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    results = {name: json.loads(path.read_text()) for name in (*SCRIPTS, *LISTED)
               if (path := HERE / "results" / f"{name}.json").exists()}
    results.update({path.stem: json.loads(path.read_text()) for path in sorted((HERE / "results").glob("gpu_run*.json"))})
    print(f"\n{'goal':<52}{'value':>14}{'goal':>14}  met")
    for name, result in results.items():
        where = f" ({name}: {result.get('gpu')})" if name.startswith("gpu") else ""  # device_check.sh, not run here
        for goal, row in result.get("goals", {}).items():
            if row["value"] is None:  # written as not measured (e.g. views_budget.py --variants)
                print(f"{goal + where:<52}{'not run':>14}{'':>4}{row['goal']:>10,}  NO")
                continue
            print(f"{goal + where:<52}{row['value']:>14,.3f}{bound(row):>4}{row['goal']:>10,}  {'yes' if row['met'] else 'NO'}")
    print(f"\n{'scaling, views/s':<40}{'1':>10}{'2':>10}{'ratio':>8}")
    for result in results.values():
        for name, row in result.get("scaling", {}).items():
            one, two = (v for k, v in row.items() if k.endswith("_views_per_s"))
            print(f"{name:<40}{one:>10,.1f}{two:>10,.1f}{row['ratio_2_vs_1']:>8.3f}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def bound(row: dict) -> str:
    """``<=`` or ``>=``: a goal's ``better`` field, else what its ``met`` says."""
    if "better" in row:
        return "<=" if row["better"] == "lower" else ">="
    if "ci95" in row:  # judged on its interval's lower end (views_budget.py): a lower bound
        return ">="
    below, above = row["value"] <= row["goal"], row["value"] >= row["goal"]
    return "<=" if below == row["met"] and above != row["met"] else ">="


if __name__ == "__main__":
    main()
