"""One entry point for every benchmark: runs each script, then prints one table of goals.

``.venv/bin/python benchmarks/run_all.py [--quick]``. Each script measures its comparison
side by side in one run and writes ``benchmarks/results/<name>.json`` (``--quick`` checks the
scripts with tiny models and writes nothing). The same scripts run unchanged on a GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ("extract", "distill", "reader")


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
    print(f"\n{'goal':<40}{'value':>14}{'goal':>10}  met")
    for name in SCRIPTS:
        path = HERE / "results" / f"{name}.json"
        if not path.exists():
            continue
        for goal, row in json.loads(path.read_text()).get("goals", {}).items():
            print(f"{goal:<40}{row['value']:>14,.3f}{row['goal']:>10,}  {'yes' if row['met'] else 'NO'}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
