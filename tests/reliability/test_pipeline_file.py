"""A pipeline file is checked whole before its first stage (issue 11): a misspelt key in any
section is one line and nothing is written; a teacher without weights only when asked for;
``cache: {out: PATH}`` puts the cache there."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hgkd.pipelines.cli import main as pipeline_cli
from hgkd.pipelines.report import write_report
from hgkd.pipelines.run import mark_random_teacher, stage_cache
from hgkd.pipelines.spec import spec_from_dict
from hgkd.storage.cache import FeatureCache

from cli_results import assert_one_line_error, invoke


def base_spec(tmp_path: Path, data: str) -> dict:
    return {"name": "t", "out": str(tmp_path / "out"), "data": [data],
            "teacher": {"name": "mae_vit_tiny_patch16", "img_size": 64, "random_init": True},
            "cache": {"views_per_image": 1, "shard_views": 8, "batch_size": 4},
            "distill": {"student": "resnet18", "sparse_backend": "masked", "epochs": 1, "batch_size": 4},
            "eval": {"tasks": ["knn"]}, "variants": [{"name": "hgkd"}, {"name": "kd", "method": "kd"}],
            "classifier_teacher": {"epochs": 1}}


def set_path(blob: dict, dotted: str, value) -> None:
    node = blob
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize("edit,message", [
    ({"teacher.chekpoint": "/x.pth", "teacher.random_init": None},
     "teacher: unknown key 'chekpoint' (did you mean 'checkpoint'?)"),
    ({"teacher.random_init": None}, "teacher: give 'checkpoint' (or 'pretrain_mae'); a randomly initialised teacher "
                                    "only with 'random_init: true'"),
    ({"cache.mask_ration": 0.5}, "cache: unknown key 'mask_ration' (did you mean 'mask_ratio'?)"),
    ({"distill.epoch": 2}, "variant hgkd: unknown keys ['epoch']"),
    ({"variants.0.unett": False}, "variant hgkd: unknown keys ['unett']"),
    ({"classifier_teacher.epoch": 2}, "bad 'classifier_teacher' option"),
    ({"cache.shard_views": "many"}, "cache: shard_views: expected an integer, got 'many'"),
    ({"distill.epochs": "one"}, "variant hgkd: epochs: expected an integer, got 'one'"),
], ids=["teacher-misspelt", "teacher-no-weights", "cache", "distill", "variant", "classifier_teacher", "cache-type",
        "distill-type"])
def test_a_misspelt_key_anywhere_is_one_line_before_any_stage(photo_tars, tmp_path, edit, message):
    blob = base_spec(tmp_path, photo_tars)
    for dotted, value in edit.items():
        set_path(blob, dotted, value)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(blob))
    result = invoke(pipeline_cli, ["run", str(path)])
    assert_one_line_error(result, str(path))
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_cache_out_puts_the_pipeline_cache_there(photo_tars, tmp_path):
    blob = base_spec(tmp_path, photo_tars)
    blob["cache"]["out"] = str(tmp_path / "elsewhere" / "mine.zarr")
    url = stage_cache(spec_from_dict(blob, source="p.yaml"), None)
    assert url == blob["cache"]["out"] and FeatureCache.open(url).is_complete()


def test_a_random_init_teacher_is_marked_in_the_results_table(tmp_path):
    spec = spec_from_dict(base_spec(tmp_path, "a.tar"), source="p.yaml")
    rows = [{"variant": "hgkd", "description": "distilled", "knn_top1": 50.0}, {"variant": "scratch", "knn_top1": 9.0}]
    write_report(rows, tmp_path, mark_random_teacher(spec, rows))
    assert (tmp_path / "results.md").read_text().startswith("## t [random-init teacher: no trained weights]")
    csv = (tmp_path / "results.csv").read_text()
    assert "distilled [random-init teacher]" in csv and csv.count("[random-init teacher]") == 2


def test_a_pipeline_cache_that_fails_verify_is_repaired_as_the_message_says(photo_tars, tmp_path):
    from hgkd.errors import HgkdError
    from hgkd.extract.cli import main as extract_cli
    from hgkd.storage.verify import verify_cache

    spec = spec_from_dict(base_spec(tmp_path, photo_tars), source="p.yaml")
    url = stage_cache(spec, None)
    shard = Path(url) / "tokens" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[50] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(HgkdError, match=f"run 'hgkd-extract repair {url}' and run the pipeline again"):
        stage_cache(spec, None)
    assert invoke(extract_cli, ["repair", url]).returncode == 0
    assert stage_cache(spec, None) == url and verify_cache(url).ok
