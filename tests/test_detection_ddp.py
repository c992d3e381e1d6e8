"""``hgkd-evaluate detection`` under torchrun: two gloo ranks on CPU against one process with the
same global batch (issue 19).

Each rank takes its half of every global batch of the same order, with the same flips, and DDP
averages the two half-batch gradients. The steps cannot be bit-equal to one process's: the
RPN's and RoI heads' positive/negative sampling draws from each process's torch RNG (rank 1
draws for its images what one process would draw for others), and Mask R-CNN's mask loss is a
mean over each rank's positive RoIs. So the test checks the recipe (same images, steps, batch,
lr, test set, detections from both ranks gathered on rank 0, only rank 0 writing) and that the
losses stay close: with frozen BN (no batch statistics) the logged epoch losses were 4.2865 /
4.3410 for one process and 4.2865 / 4.3408 for two ranks (4 steps on the tiny set); the test
allows 0.02.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_detection import ARCH, TINY, data_args, detect, digits  # noqa: F401  (fixture)

EPOCH_LOSS = re.compile(r"detection epoch (\d+)/\d+: loss ([\d.]+)")
ARGS = ["--epochs", "2", "--norm", "frozen"]


def test_two_ranks_match_one_process(digits, tmp_path, caplog):  # noqa: F811
    import logging

    with caplog.at_level(logging.INFO, logger="hgkd.evaluate.detection"):
        result = detect(digits, tmp_path / "one" / "det.json", *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    want = json.loads((tmp_path / "one" / "det.json").read_text())
    want_losses = {int(e): float(v) for e, v in EPOCH_LOSS.findall(caplog.text)}

    out = tmp_path / "two" / "det.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_port", "29571", "-m", "hgkd.evaluate.cli", "-v", "detection", "--model", f"scratch:{ARCH}",
           *data_args(digits), *TINY, *ARGS, "--out", str(out)]
    ranks = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    got = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["det.bbox.json", "det.ckpt", "det.json", "det.segm.json"]
    assert ranks.stdout.count("AP50") == 1  # rank 0 alone prints the table
    logged = EPOCH_LOSS.findall(ranks.stderr)
    assert len(logged) == 4 and len(set(logged)) == 2, ranks.stderr[-3000:]  # both ranks log the reduced loss
    got_losses = {int(e): float(v) for e, v in logged}

    assert (got["ranks"], want["ranks"], got["device"]) == (2, 1, "cpu")
    same = ("n_train", "n_test", "n_classes", "iterations", "batch_size", "lr", "recipe")
    assert {k: got[k] for k in same} == {k: want[k] for k in same}
    assert sorted(got_losses) == sorted(want_losses) == [1, 2]
    for epoch, loss in want_losses.items():
        assert got_losses[epoch] == pytest.approx(loss, abs=0.02), (got_losses, want_losses)
    tested = {d["image_id"] for d in json.loads(Path(got["detections"]["bbox"]).read_text())}
    assert len(tested) == got["n_test"] == 4  # both ranks' shares of the test set, gathered
