"""A tiny pipeline end to end: MAE-pretrained teacher, one cache, three variants, evaluations."""
from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hgkd.extract.demo_data import write_digits_shards
from hgkd.pipelines.run import run_pipeline
from hgkd.pipelines.spec import load_spec, spec_from_dict


def tiny_spec(tmp_path: Path):
    train, test = write_digits_shards(tmp_path / "data", img_size=32, max_images=240, per_shard=64)
    return spec_from_dict({
        "name": "tiny", "out": str(tmp_path / "out"), "data": [train],
        "teacher": {"name": "mae_vit_tiny_patch16", "img_size": 32, "pretrain_mae": {"epochs": 1}},
        "cache": {"views_per_image": 1, "mask_ratio": 0.5, "shard_views": 64},
        "distill": {"student": "resnet18", "sparse_backend": "masked", "epochs": 1, "warmup_epochs": 0,
                    "batch_size": 32, "queue_size": 64, "decoder_width": 32, "workers": 0},
        "eval": {"train": [train], "test": [test], "tasks": ["knn", "mlp"], "img_size": 32},
        "variants": [{"name": "hgkd"}, {"name": "no_sim", "similarity": False}, {"name": "scratch", "scratch": True}],
    })


def test_tiny_pipeline_end_to_end_and_skip_on_rerun(tmp_path):
    spec = tiny_spec(tmp_path)
    paths = run_pipeline(spec)
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["hgkd", "no_sim", "scratch"]
    for row in rows:
        for key in ("knn_top1", "mlp_top1"):
            assert 0.0 <= float(row[key]) <= 100.0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| hgkd |" in paths["md"].read_text()
    out = Path(spec.out)
    done = [out / "teacher" / "mae_vit_tiny_patch16-mae.pth", out / "runs" / "hgkd" / "checkpoints" / "last.pt",
            out / "runs" / "no_sim" / "student.safetensors", out / "eval" / "scratch" / "knn.json"]
    stamps = [p.stat().st_mtime_ns for p in done]
    start = time.perf_counter()
    again = run_pipeline(tiny_spec(tmp_path))
    assert [p.stat().st_mtime_ns for p in done] == stamps  # nothing recomputed
    assert again["csv"].read_text() == paths["csv"].read_text()
    assert time.perf_counter() - start < 30


def test_table5_pipeline_file_has_the_seven_rows():
    spec = load_spec(str(Path(__file__).parents[1] / "pipelines" / "ablation_table5.yaml"),
                     ["teacher.checkpoint=/x.pth"])
    switches = {v["name"]: (v["sparse"], v["unet"], v["similarity"]) for v in spec.variants}
    assert switches == {"full": (True, True, True), "wo_unet": (True, False, True), "wo_sparse": (False, True, True),
                        "wo_similarity": (True, True, False), "only_similarity": (False, False, True),
                        "only_sparse": (True, False, False), "only_unet": (False, True, False)}
    assert spec.teacher["checkpoint"] == "/x.pth" and all("seed" in v for v in spec.variants)


@pytest.mark.parametrize("text, message", [("name: [unclosed\n", "invalid YAML"),
                                          ("name: x\nout: y\n", "missing keys"),
                                          ("name: x\nout: y\ndata: a\nteacher: {name: t}\nvariants: []\nbogus: 1\n",
                                           "unknown keys ['bogus']")])
def test_invalid_pipeline_file_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "hgkd.pipelines.cli", "run", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
