"""Run a pipeline: teacher (optionally MAE-pretrained) -> one cache -> N students -> evaluations.

Each stage leaves a file that says it is done, and is skipped on a re-run: the teacher
checkpoint, a complete verified cache, a run whose last checkpoint reached its epochs (a
partial run is resumed), the exported student, each evaluation's JSON. This module only
composes the other packages; it owns no maths.
"""
from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..distill.checkpoint import LAST, load_checkpoint
from ..distill.classifier import load_classifier, load_run_classifier
from ..distill.config import DistillConfig
from ..distill.export_run import export_run
from ..distill.methods import method_class
from ..distill.teacher_train import TeacherConfig, accuracy, train_teacher
from ..distill.train import Trainer
from ..errors import HgkdError
from ..extract.data import open_source
from ..extract.demo_data import write_digits_shards
from ..extract.run import ExtractConfig, run_extract
from ..extract.teachers.mae_pretrain import pretrain_mae
from ..extract.views import ViewConfig, decode_image
from ..storage.cache import FeatureCache
from ..storage.codecs import CodecSpec
from ..storage.verify import verify_cache
from .report import write_report
from .spec import PipelineSpec

log = logging.getLogger(__name__)
VARIANT_KEYS = ("name", "scratch", "description")
BUILTIN = "builtin:"


def resolve_builtin(spec: PipelineSpec) -> None:
    """Replace ``builtin:digits-train|test`` entries with shards written under ``out/data``."""
    entries = [*spec.data, *spec.eval.train, *spec.eval.test]
    if not any(e.startswith(BUILTIN) for e in entries):
        return
    opts = {"img_size": int(spec.teacher.get("img_size", 224)), **spec.builtin}
    try:
        train, test = write_digits_shards(spec.out_dir / "data", **opts)
    except TypeError as err:
        raise HgkdError(f"{spec.source}: bad 'builtin' option ({err})") from None
    known = {f"{BUILTIN}digits-train": train, f"{BUILTIN}digits-test": test}

    def resolve(items: list[str]) -> list[str]:
        bad = [e for e in items if e.startswith(BUILTIN) and e not in known]
        if bad:
            raise HgkdError(f"{spec.source}: unknown data {bad[0]!r}; built in: {', '.join(known)}")
        return [known.get(e, e) for e in items]

    spec.data, spec.eval.train, spec.eval.test = resolve(spec.data), resolve(spec.eval.train), resolve(spec.eval.test)


def is_supervised(spec: PipelineSpec, variant: dict[str, Any]) -> bool:
    return not variant.get("scratch") and method_class(variant.get("method", spec.distill.get("method", "hgkd"))).supervised


def stage_teacher(spec: PipelineSpec) -> str | None:
    """The teacher checkpoint: given, or MAE-pretrained on the pipeline's data (once)."""
    teacher = spec.teacher
    pretrain = teacher.get("pretrain_mae")
    if not pretrain:
        return teacher.get("checkpoint")
    out = spec.out_dir / "teacher" / f"{teacher['name']}-mae.pth"
    if out.exists():
        log.info("teacher: reusing %s", out)
        return str(out)
    images = torch.stack([decode_image(s.data) for s in open_source(spec.data) if s.data is not None])
    size = int(teacher.get("img_size", 224))
    if images.shape[-1] != size or images.shape[-2] != size:
        raise HgkdError(f"{spec.source}: teacher.pretrain_mae needs {size}px square images; got {tuple(images.shape[-2:])}")
    return str(pretrain_mae(teacher["name"], images, out, **pretrain))


def _extract_config(spec: PipelineSpec, checkpoint: str | None, cache_url: str) -> ExtractConfig:
    opts = dict(spec.cache)
    view_keys = {f.name for f in fields(ViewConfig)}
    codec_keys = {f.name for f in fields(CodecSpec)}
    view = ViewConfig(img_size=int(spec.teacher.get("img_size", 224)),
                      **{k: v for k, v in opts.items() if k in view_keys and k != "img_size"})
    codec = CodecSpec(**{k: v for k, v in opts.items() if k in codec_keys})
    rest = {k: v for k, v in opts.items() if k not in view_keys | codec_keys}
    try:
        return ExtractConfig(data=spec.data, out=cache_url, teacher=spec.teacher["name"], checkpoint=checkpoint,
                             view=view, codec=codec, progress=False, **rest)
    except TypeError as err:
        raise HgkdError(f"{spec.source}: bad 'cache' option ({err})") from None


def stage_cache(spec: PipelineSpec, checkpoint: str | None) -> str:
    """Extract once; a complete cache that verifies clean is reused as it is."""
    cache_url = spec.cache.get("out") or str(spec.out_dir / "cache.zarr")
    cfg = _extract_config(spec, checkpoint, cache_url)
    if FeatureCache.exists(cache_url) and FeatureCache.open(cache_url).is_complete():
        report = verify_cache(cache_url)
        if not report.ok:
            raise HgkdError(f"cache {cache_url} is complete but fails verify ({report.problems[0]}); "
                            "delete it or point cache.out elsewhere")
        log.info("cache: reusing verified %s", cache_url)
    run_extract(cfg)  # also refuses a cache made with other settings; a no-op when complete
    return cache_url


def stage_classifier_teacher(spec: PipelineSpec, mim_checkpoint: str | None) -> str:
    """The baselines' classifier teacher, trained once: by default the pipeline's ViT teacher
    started from its MIM checkpoint and fine-tuned on the labels (with HSAKD's branches)."""
    out = spec.out_dir / "teacher" / "classifier.pt"
    if out.exists():
        log.info("classifier teacher: reusing %s", out)
        return str(out)
    opts = {"arch": spec.teacher["name"], "img_size": int(spec.teacher.get("img_size", 224)),
            "branches": True, "test_data": list(spec.eval.test), **spec.classifier_teacher}
    if opts["arch"] == spec.teacher["name"]:
        opts.setdefault("init_checkpoint", mim_checkpoint)
    try:
        cfg = TeacherConfig(data=spec.data, out=str(out), **opts)
    except TypeError as err:
        raise HgkdError(f"{spec.source}: bad 'classifier_teacher' option ({err})") from None
    log.info("classifier teacher: %s", train_teacher(cfg))
    return str(out)


def teacher_row(path: str) -> dict[str, Any]:
    """A results row for the classifier teacher: its own held-out top-1 (``classifier_top1``)."""
    net, extra = load_classifier(path)
    row: dict[str, Any] = {"variant": "teacher", "description": f"classifier teacher {net.arch} (not a student)"}
    top1 = extra.get("metrics", {}).get("test_top1")
    if top1 is not None:
        row["classifier_top1"] = float(top1)
    return row


def kept_json(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """An evaluation's result: read back if ``path`` exists, else computed and written there."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def stage_classifier_eval(spec: PipelineSpec, variant: dict[str, Any]) -> dict[str, float]:
    """A supervised student's own head on the held-out set (the KD papers' metric), kept as JSON."""
    def compute() -> dict[str, Any]:
        net = load_run_classifier(spec.out_dir / "runs" / variant["name"], int(spec.teacher.get("img_size", 224)))
        return {"top1": accuracy(net, spec.eval.test)}

    result = kept_json(spec.out_dir / "eval" / variant["name"] / "classifier.json", compute)
    return {"classifier_top1": float(result["top1"])}


def distill_config(spec: PipelineSpec, variant: dict[str, Any], cache_url: str | None,
                   classifier: str | None = None) -> DistillConfig:
    opts = {**spec.distill, **{k: v for k, v in variant.items() if k not in VARIANT_KEYS}}
    opts.update(data=spec.data, out=str(spec.out_dir / "runs" / variant["name"]))
    if is_supervised(spec, variant):
        opts.update(teacher_classifier=classifier)
    else:
        opts.update(cache=cache_url)
    opts.setdefault("log_every", 0)
    return DistillConfig.from_dict(opts, source=f"{spec.source} variant {variant['name']}")


def stage_distill(spec: PipelineSpec, variant: dict[str, Any], cache_url: str | None,
                  classifier: str | None = None) -> str:
    """Train (or resume, or skip) one variant; returns the model for evaluation."""
    if variant.get("scratch"):
        return f"scratch:{spec.distill.get('student', 'resnet50')}"
    cfg = distill_config(spec, variant, cache_url, classifier)
    run_dir = Path(cfg.out)
    exported = run_dir / "student.safetensors"
    last = run_dir / "checkpoints" / LAST
    finished = last.exists() and load_checkpoint(last)["epoch"] >= cfg.epochs
    if not finished:
        log.info("distill %s: %s", variant["name"], "resuming" if last.exists() else "starting")
        Trainer(cfg, resume=last.exists()).fit()
    if not exported.exists() or exported.stat().st_mtime < last.stat().st_mtime:
        export_run(run_dir, exported)
    return str(exported)


def stage_eval(spec: PipelineSpec, variant: dict[str, Any], model: str) -> dict[str, float]:
    """Every evaluation task of one variant; each result is kept as JSON and reused."""
    from .evaluation import evaluate_task

    metrics: dict[str, float] = {}
    for task in spec.eval.tasks:
        result = kept_json(spec.out_dir / "eval" / variant["name"] / f"{task}.json",
                           lambda: evaluate_task(task, model, spec.eval))
        metrics[f"{task}_top1"] = float(result["top1"])
        if "top5" in result:
            metrics[f"{task}_top5"] = float(result["top5"])
    return metrics


def run_pipeline(spec: PipelineSpec) -> dict[str, Path]:
    """All stages in order; returns the paths of results.csv/.md/.png."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    resolve_builtin(spec)
    checkpoint = stage_teacher(spec)
    trained = [v for v in spec.variants if not v.get("scratch")]
    supervised = [v for v in trained if is_supervised(spec, v)]
    cache_url = stage_cache(spec, checkpoint) if len(supervised) < len(trained) else None
    classifier = stage_classifier_teacher(spec, checkpoint) if supervised else None
    rows = [teacher_row(classifier)] if classifier else []
    for variant in spec.variants:
        model = stage_distill(spec, variant, cache_url, classifier)
        row = {"variant": variant["name"], "description": variant.get("description", "")}
        row.update(stage_eval(spec, variant, model))
        if spec.eval.test and not variant.get("scratch") and is_supervised(spec, variant):
            row.update(stage_classifier_eval(spec, variant))
        rows.append(row)
    return write_report(rows, spec.out_dir, spec.name)
