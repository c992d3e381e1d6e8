"""A tiny pipeline end to end: MAE-pretrained teacher, one cache, three variants, evaluations."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hgkd.errors import HgkdError
from hgkd.data.demo_data import write_digits_shards
from hgkd.pipelines.report import aggregate, markdown_table, set_title, write_report
from hgkd.pipelines.run import run_pipeline, validate_stages
from hgkd.pipelines.spec import load_spec, spec_from_dict
from hgkd.storage.cache import FeatureCache


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
    validate_stages(spec)  # every section's options build (cache codec included)


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


def budget_spec(tmp_path: Path, **over):
    """Issue 12's sweep in miniature: two caches of one teacher, a held-out cache, seeds, online."""
    train, test = write_digits_shards(tmp_path / "data", img_size=32, max_images=120, per_shard=64)
    blob = {
        "name": "tiny views budget", "out": str(tmp_path / "out"), "data": [train],
        "teacher": {"name": "mae_vit_tiny_patch16", "img_size": 32, "pretrain_mae": {"epochs": 1}},
        "caches": {"masked": {"views_per_image": 2, "mask_ratio": 0.5, "shard_views": 64},
                   "full": {"views_per_image": 1, "mask_ratio": 0.5, "teacher_view": "full", "shard_views": 64}},
        "heldout": {"data": [test]},
        "distill": {"student": "resnet18", "sparse_backend": "masked", "epochs": 1, "warmup_epochs": 0,
                    "batch_size": 30, "queue_size": 64, "decoder_width": 32, "workers": 0},
        "eval": {"train": [train], "test": [test], "tasks": ["knn", "mlp"], "img_size": 32},
        "variants": [{"name": "online", "online": "masked", "seeds": [0, 1]},
                     {"name": "k1", "cache": "masked", "cache_views": 1},
                     {"name": "k2", "cache": "masked"},
                     {"name": "full_fresh", "cache": "full", "student_mask": "fresh"}],
        **over,
    }
    return spec_from_dict(blob)


def test_views_budget_pipeline_caches_seeds_online_and_cost_columns(tmp_path, capsys):
    spec = budget_spec(tmp_path)
    paths = run_pipeline(spec)
    with paths["csv"].open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["online", "k1", "k2", "full_fresh"]
    for row in rows.values():
        for key in ("knn_top1", "mlp_top1", "fidelity_cos", "teacher_fwd", "cache_gb"):
            assert row[key] != "", (row["variant"], key)
        assert -1.0 <= float(row["fidelity_cos"]) <= 1.0
    # seeds: one run per seed, aggregated as mean and sample std
    with paths["runs_csv"].open() as f:
        runs = {r["run"]: r for r in csv.DictReader(f)}
    assert set(runs) == {"online-s0", "online-s1", "k1", "k2", "full_fresh"}
    mlp = [float(runs[f"online-s{s}"]["mlp_top1"]) for s in (0, 1)]
    assert float(rows["online"]["mlp_top1"]) == pytest.approx(sum(mlp) / 2)
    assert float(rows["online"]["mlp_top1_std"]) == pytest.approx(abs(mlp[0] - mlp[1]) / 2 ** 0.5)
    assert rows["online"]["seeds"] == "2" and rows["k1"]["seeds"] == ""
    assert " ± " in paths["md"].read_text()
    # costs: online spends live forwards and no cache; K=1 of a K=2 cache counts half its bytes
    n_train = 90
    assert float(rows["online"]["cache_gb"]) == 0.0
    # one live forward per student image, and one per image of the queue pre-fill (queue 64 < 90 images)
    assert float(rows["online"]["teacher_fwd"]) == n_train + 64
    assert float(rows["k1"]["cache_gb"]) == pytest.approx(float(rows["k2"]["cache_gb"]) / 2)
    assert float(rows["k1"]["teacher_fwd"]) == n_train  # its one cached view of each image
    # two held-out caches (masked and full teacher views), the frontier plot, every stage announced
    assert sorted(p.name for p in (Path(spec.out) / "heldout").glob("*.zarr")) == ["full.zarr", "masked.zarr"]
    assert paths["frontier"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # sweep cost (issue 22, P7): each cache once from its record, each run, a live teacher timed
    cost = json.loads(paths["sweep_cost"].read_text())
    assert set(cost["runs"]) == {"online-s0", "online-s1", "k1", "k2", "full_fresh"}
    assert len(cost["caches"]) == 2 and all(c["extraction_seconds"] > 0 and c["teacher_seconds_per_view"] > 0
                                            for c in cost["caches"].values())
    cached_runs = [r for r in cost["runs"].values() if r["cache"]]
    assert all(r["live_wall_s"] > r["wall_s"] for r in cached_runs)
    assert cost["cached_sweep_seconds"] == pytest.approx(
        sum(c["extraction_seconds"] for c in cost["caches"].values()) + sum(r["wall_s"] for r in cost["runs"].values()))
    assert cost["p7"] == pytest.approx(cost["cached_sweep_seconds"] / cost["live_sweep_seconds"])
    assert "P7 = " in paths["md"].read_text()
    err = capsys.readouterr().err
    for stage in ("teacher: MAE pre-training", "cache masked: extracting", "held-out cache full: extracting",
                  "distill online-s1: starting", "evaluate: 5 runs"):
        assert f"[hgkd-pipeline] {stage}" in err, stage
    assert "distill: 100%" in err and ("run/s" in err or "s/run" in err)


def test_seeds_draw_their_own_cache_online_twins_follow_it_and_evaluation_follows_the_seed(tmp_path):
    """Issue 22: a variant with seeds reads a cache drawn with each seed; the online variant of
    that seed is the twin of that very cache (views, batches, queue pre-fill); each run's
    probes are seeded with the run's seed."""
    spec = budget_spec(tmp_path, caches={"masked": {"views_per_image": 1, "mask_ratio": 0.5, "shard_views": 64}},
                       heldout={}, eval={"train": [], "test": [], "tasks": ["knn"], "img_size": 32},
                       variants=[{"name": "k1", "cache": "masked", "seeds": [0, 1]},
                                 {"name": "online", "online": "masked", "seeds": [0, 1]}])
    data = spec.data
    spec.eval.train, spec.eval.test = data, []
    run_pipeline(spec)
    out = Path(spec.out)
    for seed in (0, 1):
        cache = FeatureCache.open(str(out / "caches" / f"masked-s{seed}.zarr"))
        assert cache.meta.view["seed"] == seed and cache.is_complete()
        for name in (f"k1-s{seed}", f"online-s{seed}"):
            config = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
            assert config["cache"] == str(out / "caches" / f"masked-s{seed}.zarr") and config["seed"] == seed
            assert json.loads((out / "eval" / name / "knn.json").read_text())["seed"] == seed
        assert config["online_teacher"] == spec.teacher["name"]
    assert not (out / "caches" / "masked.zarr").exists()  # no seedless copy: nothing reads it


@pytest.mark.parametrize("over, message", [
    ({"cache": {"views_per_image": 1}}, "either 'cache' or 'caches'"),
    ({"variants": [{"name": "a", "cache": "nope"}]}, "'nope' is not one of the caches"),
    ({"variants": [{"name": "a", "online": "masked", "cache": "full"}]}, "an online variant reads no cache"),
    ({"variants": [{"name": "a", "seed": 1, "seeds": [0, 1]}]}, "'seed' or 'seeds'"),
    ({"variants": [{"name": "a", "seeds": [0, 0]}]}, "distinct integers"),
    ({"heldout": {"views_per_image": 1}}, "'heldout' needs 'data'"),
])
def test_views_budget_spec_errors_are_one_line(tmp_path, over, message):
    with pytest.raises(HgkdError, match=message):
        budget_spec(tmp_path, **over)


def test_report_aggregates_seeds_and_fits_a_long_title(tmp_path):
    rows = [{"variant": "a", "run": f"a-s{s}", "description": "", "mlp_top1": v, "teacher_fwd": 10.0}
            for s, v in enumerate((90.0, 92.0, 94.0))] + [{"variant": "b", "run": "b", "mlp_top1": 80.0,
                                                           "teacher_fwd": 1000.0}]
    table = aggregate(rows)
    assert table[0]["mlp_top1"] == 92.0 and table[0]["mlp_top1_std"] == 2.0 and table[0]["seeds"] == 3
    assert "| a | 92.00 ± 2.00 | 3 | 10 |" in markdown_table(table, "t")
    title = "H-GKD demo (digits, 64 px): MAE mini-ViT teacher -> sparse ResNet-18, a title far too long for one line"
    paths = write_report(rows, tmp_path, title)
    assert set(paths) == {"csv", "md", "png", "runs_csv", "frontier"}
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    set_title(ax, fig, title)
    fig.tight_layout()
    fig.canvas.draw()
    box, page = ax.title.get_window_extent(), fig.bbox
    assert box.x0 >= page.x0 and box.x1 <= page.x1 and "\n" in ax.get_title()
    plt.close(fig)


def test_views_budget_pipeline_file_is_the_issue_12_frontier():
    spec = load_spec(str(Path(__file__).parents[1] / "pipelines" / "views_budget.yaml"))
    by_epochs: dict[int, dict[str, dict]] = {}
    for v in spec.variants:
        by_epochs.setdefault(v["epochs"], {})[v.get("online") and "online" or
                                               f"{spec.cache_name(v)}_k{v.get('cache_views')}"] = v
    assert sorted(by_epochs) == [8, 32]
    expected = {"online", "masked_k1", "masked_k2", "masked_k4", "masked_k8", "full_k1", "full_k2"}
    for epochs, rows in by_epochs.items():
        assert set(rows) == expected
        assert all(len(v["seeds"]) >= (3 if epochs == 8 else 2) for v in rows.values())
        assert len({v.get("warmup_epochs") for v in rows.values()}) == 1  # one recipe per schedule
        assert all(v.get("student_mask") == "fresh" for k, v in rows.items() if k.startswith("full"))
    assert spec.caches["full"]["teacher_view"] == "full" and spec.caches["masked"]["views_per_image"] == 8
    assert spec.data == ["builtin:digits-train"] and spec.heldout["data"] == ["builtin:digits-test"]
    # issue 22: the claims are named in the file, before any run, and compare paired seeds
    assert {c["name"]: (c["candidate"], c["reference"]) for c in spec.claims} == {
        "P6": ("full_k1_e8", "online_e8"), "P6_long": ("full_k1_e32", "online_e32")}
    validate_stages(spec)


@pytest.mark.parametrize("claim, message", [
    ({"name": "x", "candidate": "k1", "reference": "nope", "metric": "mlp_top1", "min_ratio": 0.99, "max_cost": 1},
     "reference 'nope' is not a variant"),
    ({"name": "x", "candidate": "k1", "reference": "online", "metric": "mlp_top1", "min_ratio": 0.99, "max_cost": 1},
     "same seeds"),
    ({"name": "x", "candidate": "k1"}, "give exactly"),
])
def test_claims_are_checked_when_the_file_is_read(tmp_path, claim, message):
    with pytest.raises(HgkdError, match=message):
        budget_spec(tmp_path, claims=[claim])


def test_a_task_can_run_twice_under_names_with_their_own_options(tmp_path):
    """eval.options entries with 'task' name an instance of a registered task (the demo's few-label
    fine-tune beside the full one); their options are checked against that task."""
    spec = budget_spec(tmp_path, eval={"tasks": ["knn", "knn_k3"], "options": {"knn_k3": {"task": "knn", "k": 3}}})
    assert spec.eval.task_of("knn_k3") == ("knn", {"k": 3}) and spec.eval.task_of("knn") == ("knn", {})
    with pytest.raises(HgkdError, match="eval options of knn_k3: unknown \\['epochs'\\]"):
        budget_spec(tmp_path, eval={"tasks": ["knn_k3"], "options": {"knn_k3": {"task": "knn", "epochs": 3}}})
    with pytest.raises(HgkdError, match="unknown eval tasks \\['knn_k3'\\]"):
        budget_spec(tmp_path, eval={"tasks": ["knn_k3"]})


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "pipelines").glob("*.yaml")))
def test_every_shipped_pipeline_file_builds_every_stage(name):
    validate_stages(load_spec(str(Path(__file__).parents[1] / "pipelines" / name)))


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
def test_a_detection_task_reads_its_own_sets_and_fills_box_and_mask_columns(tmp_path):
    """A pipeline's detection task trains on the COCO sets named in its options (not eval.train),
    keeps its detections beside the record, and its record becomes box/mask AP columns."""
    from hgkd.data.digit_detection import write_digit_detection
    from hgkd.pipelines.evaluation import evaluate_task
    from hgkd.pipelines.run import task_metrics

    sets = write_digit_detection(tmp_path / "det", n_train=4, n_val=2, canvas=64, scale=(16, 30))
    (train, train_images), (val, val_images) = sets["train"], sets["val"]
    tiny = {"task": "detection", "train": train, "train_images": train_images, "test": val, "test_images": val_images,
            "epochs": 1, "batch_size": 2, "warmup_iters": 1, "lr_steps": [1], "train_sizes": [64], "test_size": 64,
            "width": 16, "rois_per_image": 16, "proposals": [50, 20], "detections_per_image": 10,
            "progress": False}
    spec = budget_spec(tmp_path, eval={"train": ["unused"], "tasks": ["det"], "img_size": 32, "options": {"det": tiny}})
    out = tmp_path / "eval" / "scratch" / "det.json"
    out.parent.mkdir(parents=True)
    record = evaluate_task("det", "scratch:test_resnet", spec.eval, seed=0, out=out)
    assert (record["n_train"], record["n_test"]) == (4, 2)
    assert Path(record["detections"]["segm"]).parent == out.parent
    columns = task_metrics("det", record)
    assert set(columns) == {"det_box_ap", "det_mask_ap"}
    assert columns["det_box_ap"] == record["bbox"]["AP"] and 0.0 <= columns["det_mask_ap"] <= 100.0
    assert task_metrics("knn", {"top1": 50.0, "top5": 90.0}) == {"knn_top1": 50.0, "knn_top5": 90.0}
