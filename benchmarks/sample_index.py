"""Issue 15: stage two's data start-up on 1,000 tars, first start vs second (persistent sample index).

Run: ``.venv/bin/python benchmarks/sample_index.py [--tars 1000] [--members 64] [--quick]``.
Writes ``--tars`` webdataset tars of ``--members`` synthetic samples each (a small ``.jpg``
payload and a ``.cls`` label), then times ``data.random_access.open_random_access`` - what
``distill.data.CacheViewDataset`` does with ``--data`` at start-up - into a fresh index
directory (first start: every tar header scanned, the index written) and again (second start:
tars stamped, the index read). Also timed, for reference: the start-up before issue 15
(``open_source`` reading every tar through + a header scan, every start). Medians of
``--repeats``; the page cache is warm in every arm (a cold shared file system favours the
index more). Goal: second start >= 10x faster than the first.
Writes ``benchmarks/results/sample_index.json`` with machine info and a ``goals`` object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from hgkd.data import sample_index
from hgkd.data.random_access import RandomAccessSource, open_random_access
from hgkd.data.sources import open_source


def write_tars(root: Path, tars: int, members: int, payload: int) -> str:
    rng = np.random.default_rng(0)
    for t in range(tars):
        with wds.TarWriter(str(root / f"train-{t:04d}.tar")) as sink:
            for m in range(members):
                sink.write({"__key__": f"n{t:04d}/img{m:05d}", "jpg": rng.bytes(payload), "cls": str(m % 1000)})
        path = root / f"train-{t:04d}.tar"  # an hour old, like real shards (a tar written seconds ago is not kept)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 3600 * 10**9))
    return str(root / f"train-{{0000..{tars - 1:04d}}}.tar")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tars", type=int, default=1000)
    ap.add_argument("--members", type=int, default=64, help="samples per tar")
    ap.add_argument("--payload", type=int, default=2048, help="bytes of each synthetic image member")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20 tars, 1 repeat: checks the script, not the goal")
    ap.add_argument("--out", help="JSON to write (default benchmarks/results/sample_index.json; --quick: only --out)")
    args = ap.parse_args()
    if args.quick:
        args.tars, args.repeats = 20, 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_tars(Path(tmp), args.tars, args.members, args.payload)
        index = Path(tmp) / "index"
        first, second, before = [], [], []
        for _ in range(args.repeats):
            shutil.rmtree(index, ignore_errors=True)
            first.append(timed(lambda: open_random_access(spec, index)))
            second.append(timed(lambda: open_random_access(spec, index)))
            before.append(timed(lambda: RandomAccessSource(open_source(spec), None)))
        samples = open_random_access(spec, index).source.num_samples
        index_bytes = sum(p.stat().st_size for p in index.glob("*.npz"))
    t_first, t_second, t_before = (statistics.median(x) for x in (first, second, before))
    ratio = t_first / t_second
    goals = {"sample_index_second_start_speedup": {
        "value": ratio, "goal": 10, "met": ratio >= 10,
        "measure": f"open_random_access on {args.tars} local tars x {args.members} samples: first start "
                   f"(scan + write index) / second start (stamp + read index), warm page cache",
        "other_arms": {"first_start_s": t_first, "second_start_s": t_second,
                       "before_issue_15_every_start_s": t_before, "before_vs_second": t_before / t_second}}}
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__,
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "tars": args.tars, "members_per_tar": args.members, "payload_bytes": args.payload, "samples": samples,
        "index_bytes": index_bytes, "index_format": sample_index.FORMAT, "repeats": args.repeats,
        "seconds": {"first": first, "second": second, "before_issue_15": before}, "goals": goals,
    }
    print(f"{args.tars} tars, {samples} samples: first start {t_first:.3f} s, second {t_second:.3f} s "
          f"({ratio:.1f}x; goal >= 10x {'met' if ratio >= 10 else 'NOT met'}); before issue 15 {t_before:.3f} s "
          f"every start; index {index_bytes / 1e6:.2f} MB")
    out = args.out or (None if args.quick else str(Path(__file__).parent / "results" / "sample_index.json"))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
