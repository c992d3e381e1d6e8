"""Run a pipeline: teacher (optionally MAE-pretrained) -> caches -> N students -> evaluations.

Each stage leaves a file that says it is done, and is skipped on a re-run: the teacher
checkpoint, a complete verified cache, a run whose last checkpoint reached its epochs (a
partial run is resumed), the exported student, each evaluation's JSON. Every stage prints a
start line and a progress bar with rate and ETA (issue 10). This module only composes the
other packages; it owns no maths.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..distill.checkpoint import load_checkpoint
from ..distill.classifier import load_classifier, load_run_classifier
from ..distill.config import ONLINE_VIEW_OPTIONS, DistillConfig
from ..distill.export_run import export_run
from ..distill.methods import method_class
from ..distill.teacher_train import TeacherConfig, accuracy, train_teacher
from ..distill.train import Trainer
from ..config import checked_values, unknown_keys
from ..errors import HgkdError
from ..data.sources import open_source
from ..data.demo_data import write_digits_shards
from ..extract.run import ExtractConfig, run_extract
from ..extract.teachers.mae_pretrain import pretrain_mae
from ..data.views import ViewConfig, decode_image
from ..run_layout import last_checkpoint
from ..storage.cache import FeatureCache
from ..storage.codecs import CodecSpec
from ..storage.verify import verify_cache
from .report import write_report
from .sweep_cost import SWEEP_COST_FILE, sweep_cost
from .spec import DEFAULT_CACHE, PipelineSpec

log = logging.getLogger(__name__)
VARIANT_KEYS = ("name", "scratch", "description", "variant", "online", "cache", "per_seed")
BUILTIN = "builtin:"


def announce(message: str) -> None:
    """A stage's start line, on stderr above any progress bar."""
    tqdm.write(f"[hgkd-pipeline] {message}", file=sys.stderr)


def stage_bar(total: int, desc: str, unit: str) -> tqdm:
    """A stage's own bar over its units (runs, evaluations): count, rate and ETA."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def resolve_builtin(spec: PipelineSpec) -> None:
    """Replace ``builtin:digits-train|test`` entries with shards written under ``out/data``."""
    if isinstance(spec.heldout.get("data"), str):
        spec.heldout["data"] = [spec.heldout["data"]]
    heldout = list(spec.heldout.get("data", []))
    entries = [*spec.data, *spec.eval.train, *spec.eval.test, *heldout]
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
    if heldout:
        spec.heldout["data"] = resolve(heldout)


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
        announce(f"teacher: reusing {out}")
        return str(out)
    announce(f"teacher: MAE pre-training {teacher['name']} ({pretrain.get('epochs', 'default')} epochs) -> {out}")
    images = torch.stack([decode_image(s.data) for s in open_source(spec.data) if s.data is not None])
    size = int(teacher.get("img_size", 224))
    if images.shape[-1] != size or images.shape[-2] != size:
        raise HgkdError(f"{spec.source}: teacher.pretrain_mae needs {size}px square images; got {tuple(images.shape[-2:])}")
    return str(pretrain_mae(teacher["name"], images, out, **pretrain))


def _extract_config(spec: PipelineSpec, options: dict[str, Any], data: list[str], checkpoint: str | None,
                    cache_url: str, label: str = "cache") -> ExtractConfig:
    opts = {k: v for k, v in options.items() if k != "out"}
    view_keys = {f.name for f in fields(ViewConfig)}
    codec_keys = {f.name for f in fields(CodecSpec)}
    extract_keys = {f.name for f in fields(ExtractConfig)} - {"view", "codec", "data", "teacher", "checkpoint",
                                                              "progress"}
    known = (view_keys - {"patch_size"}) | codec_keys | extract_keys | {"out"}  # CodecSpec.codec is a key
    if set(options) - known:
        raise HgkdError(f"{spec.source}: {label}: {unknown_keys(set(options) - known, known)}")
    where = f"{spec.source}: {label}"
    rest = checked_values(ExtractConfig, {k: v for k, v in opts.items() if k not in view_keys | codec_keys}, where)
    try:
        view = ViewConfig(img_size=int(spec.teacher.get("img_size", 224)), **checked_values(
            ViewConfig, {k: v for k, v in opts.items() if k in view_keys and k != "img_size"}, where))
        codec = CodecSpec(**checked_values(CodecSpec, {k: v for k, v in opts.items() if k in codec_keys}, where))
        return ExtractConfig(data=data, out=cache_url, teacher=spec.teacher["name"], checkpoint=checkpoint,
                             view=view, codec=codec, progress=True, **rest)
    except TypeError as err:
        raise HgkdError(f"{spec.source}: bad '{label}' option ({err})") from None


def cache_url(spec: PipelineSpec, name: str, seed: int | None = None) -> str:
    """Where cache ``name`` lives: its ``out``, else ``out/cache.zarr`` (single) or ``out/caches/NAME.zarr``;
    the copy drawn with view seed ``seed`` (a per-seed cache) gets ``-s<seed>`` before ``.zarr``."""
    options = spec.cache_options[name]
    default = spec.out_dir / ("cache.zarr" if name == DEFAULT_CACHE and not spec.caches else f"caches/{name}.zarr")
    url = str(options.get("out") or default)
    return url if seed is None else f"{url.removesuffix('.zarr')}-s{seed}.zarr"


def cache_options(spec: PipelineSpec, name: str, seed: int | None = None) -> dict[str, Any]:
    """Cache ``name``'s extraction options; a per-seed copy draws its views with ``seed``."""
    return {**spec.cache_options[name], **({} if seed is None else {"seed": seed})}


def ensure_cache(cfg: ExtractConfig, what: str) -> str:
    """Extract once; a complete cache that verifies clean is reused as it is."""
    url = cfg.out
    if FeatureCache.exists(url) and FeatureCache.open(url).is_complete():
        report = verify_cache(url)
        if not report.ok:
            raise HgkdError(f"{what} {url} is complete but fails verify ({report.problems[0]}); "
                            f"run 'hgkd-extract repair {url}' and run the pipeline again (its damaged shards are "
                            "extracted again), or point its 'out' elsewhere")
        announce(f"{what}: reusing verified {url}")
    else:
        announce(f"{what}: extracting {cfg.view.views_per_image} view(s) per image, "
                 f"teacher_view={cfg.view.teacher_view} -> {url}")
    run_extract(cfg)  # also refuses a cache made with other settings; a no-op when complete
    return url


def stage_cache(spec: PipelineSpec, checkpoint: str | None, name: str = DEFAULT_CACHE,
                seed: int | None = None) -> str:
    """One of the pipeline's caches (the single ``cache`` by default), extracted once; ``seed``:
    its copy drawn with that view seed (for the runs of that seed)."""
    url = cache_url(spec, name, seed)
    label = "cache" if name == DEFAULT_CACHE and not spec.caches else f"caches.{name}"
    cfg = _extract_config(spec, cache_options(spec, name, seed), spec.data, checkpoint, url, label)
    what = ("cache" if label == "cache" else f"cache {name}") + ("" if seed is None else f" (view seed {seed})")
    return ensure_cache(cfg, what)


def heldout_options(spec: PipelineSpec, name: str) -> dict[str, Any]:
    """The fidelity cache of cache ``name``: its teacher and view settings, the ``heldout`` overrides."""
    base = {k: v for k, v in spec.cache_options[name].items() if k not in ("out", "views_per_image")}
    return {**base, "views_per_image": 1, **{k: v for k, v in spec.heldout.items() if k != "data"}}


def stage_heldout(spec: PipelineSpec, checkpoint: str | None, names: list[str]) -> dict[str, str]:
    """Held-out caches for the fidelity column: one per distinct view setting among ``names``."""
    urls: dict[str, str] = {}
    made: dict[str, str] = {}
    for name in names:
        options = heldout_options(spec, name)
        key = json.dumps(options, sort_keys=True)
        if key not in made:
            url = str(spec.out_dir / "heldout" / f"{name}.zarr")
            cfg = _extract_config(spec, options, spec.heldout["data"], checkpoint, url, "heldout")
            made[key] = ensure_cache(cfg, f"held-out cache {name}")
        urls[name] = made[key]
    return urls


def classifier_config(spec: PipelineSpec, mim_checkpoint: str | None) -> TeacherConfig:
    """The classifier teacher's options: the pipeline's ViT teacher, then ``classifier_teacher``."""
    opts = {"arch": spec.teacher["name"], "img_size": int(spec.teacher.get("img_size", 224)),
            "branches": True, "test_data": list(spec.eval.test), **spec.classifier_teacher}
    if opts["arch"] == spec.teacher["name"]:
        opts.setdefault("init_checkpoint", mim_checkpoint)
    try:
        return TeacherConfig(data=spec.data, out=str(spec.out_dir / "teacher" / "classifier.pt"), **opts)
    except TypeError as err:
        raise HgkdError(f"{spec.source}: bad 'classifier_teacher' option ({err})") from None


def stage_classifier_teacher(spec: PipelineSpec, mim_checkpoint: str | None) -> str:
    """The baselines' classifier teacher, trained once: by default the pipeline's ViT teacher
    started from its MIM checkpoint and fine-tuned on the labels (with HSAKD's branches)."""
    out = spec.out_dir / "teacher" / "classifier.pt"
    if out.exists():
        announce(f"classifier teacher: reusing {out}")
        return str(out)
    cfg = classifier_config(spec, mim_checkpoint)
    announce(f"classifier teacher: fine-tuning {cfg.arch} on the labels -> {out}")
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


ONLINE_VIEW_KEYS = ("mask_ratio", "mask_granularity", "teacher_view")  # cache options that are run options


def online_options(spec: PipelineSpec, variant: dict[str, Any], checkpoint: str | None,
                   twin: str | None = None) -> dict[str, Any]:
    """An online variant: the pipeline's own teacher run live on views drawn like its cache's,
    with every view setting of that cache (issue 22), its seed when the cache is per seed. With
    ``twin`` (that cache, extracted for the cached variants) the run takes views, batches and
    queue pre-fill from the cache itself (``OnlineTargets``); otherwise from the options."""
    live = {"online_teacher": spec.teacher["name"], "teacher_checkpoint": checkpoint}
    if twin is not None:
        return {**live, "cache": twin}
    name, seed = spec.cache_key(variant)
    views = cache_options(spec, name, seed)
    extra = {k: views[k] for k in ONLINE_VIEW_OPTIONS if k in views}
    return {**live, "img_size": int(spec.teacher.get("img_size", 224)),
            **{k: views[k] for k in ONLINE_VIEW_KEYS if k in views}, **({"view_options": extra} if extra else {})}


def distill_config(spec: PipelineSpec, variant: dict[str, Any], cache_url: str | None,
                   classifier: str | None = None, checkpoint: str | None = None) -> DistillConfig:
    """``cache_url``: the variant's cache (None for supervised variants; for an online variant
    its twin cache when one was extracted, else None)."""
    opts = {**spec.distill, **{k: v for k, v in variant.items() if k not in VARIANT_KEYS}}
    opts.update(data=spec.data, out=str(spec.out_dir / "runs" / variant["name"]))
    if is_supervised(spec, variant):
        opts.update(teacher_classifier=classifier)
    elif variant.get("online"):
        opts.update(online_options(spec, variant, checkpoint, cache_url))
    else:
        opts.update(cache=cache_url)
    opts.setdefault("log_every", 1)  # the trainer's per-epoch bar
    return DistillConfig.from_dict(opts, source=f"{spec.source} variant {variant['name']}")


def stage_distill(spec: PipelineSpec, variant: dict[str, Any], cache_url: str | None,
                  classifier: str | None = None, checkpoint: str | None = None) -> str:
    """Train (or resume, or skip) one run; returns the model for evaluation."""
    if variant.get("scratch"):
        return f"scratch:{spec.distill.get('student', 'resnet50')}"
    cfg = distill_config(spec, variant, cache_url, classifier, checkpoint)
    run_dir = Path(cfg.out)
    exported = run_dir / "student.safetensors"
    last = last_checkpoint(run_dir)
    finished = last.exists() and load_checkpoint(last)["epoch"] >= cfg.epochs
    if not finished:
        source = "online teacher" if cfg.online_teacher else cfg.cache or "classifier teacher"
        state = "resuming" if last.exists() else "starting"
        announce(f"distill {variant['name']}: {state} ({cfg.epochs} epochs, {source})")
        Trainer(cfg, resume=last.exists()).fit()
    if not exported.exists() or exported.stat().st_mtime < last.stat().st_mtime:
        export_run(run_dir, exported)
    return str(exported)


def stage_eval(spec: PipelineSpec, variant: dict[str, Any], model: str,
               bar: tqdm | None = None) -> dict[str, float]:
    """Every evaluation task of one run, seeded with the run's seed (a probe's initialisation and
    order then vary with the seeds, issue 22); each result is kept as JSON and reused."""
    from .evaluation import evaluate_task

    metrics: dict[str, float] = {}
    for task in spec.eval.tasks:
        path = spec.out_dir / "eval" / variant["name"] / f"{task}.json"
        result = kept_json(path, lambda: evaluate_task(task, model, spec.eval, seed=int(variant.get("seed", 0)),
                                                       out=path))
        metrics.update(task_metrics(task, result))
        if bar is not None:
            bar.update(1)
    return metrics


def task_metrics(task: str, result: dict[str, Any]) -> dict[str, float]:
    """A task record's table columns: top-1/top-5 (classification), box/mask AP (detection)."""
    metrics = {f"{task}_{k}": float(result[k]) for k in ("top1", "top5") if k in result}
    for iou, column in (("bbox", "box_ap"), ("segm", "mask_ap")):
        if isinstance(result.get(iou), dict) and "AP" in result[iou]:
            metrics[f"{task}_{column}"] = float(result[iou]["AP"])
    return metrics


def stage_fidelity(spec: PipelineSpec, variant: dict[str, Any], heldout_url: str) -> dict[str, float]:
    """Token cosine of an H-GKD student on the held-out views (``hgkd.distill.fidelity``), kept as JSON."""
    from ..distill.fidelity import fidelity

    result = kept_json(spec.out_dir / "eval" / variant["name"] / "fidelity.json",
                       lambda: {**fidelity(spec.out_dir / "runs" / variant["name"], heldout_url,
                                           spec.heldout["data"]), "cache": heldout_url})
    return {"fidelity_cos": float(result["token_cosine"])}


def run_costs(spec: PipelineSpec, variant: dict[str, Any], url: str | None) -> dict[str, float]:
    """Cost columns of one trained run (issue 12): ``teacher_fwd`` from ``RUN/cost.json``, and
    ``cache_gb``: the stored bytes of the cache it used, scaled to the views per image it used
    (online: 0); ``epochs`` = image passes."""
    run_dir = spec.out_dir / "runs" / variant["name"]
    cfg = DistillConfig.from_dict(load_checkpoint(last_checkpoint(run_dir))["config"])
    cost_file = run_dir / "cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.exists() else {}
    row: dict[str, float] = {"epochs": float(cfg.epochs)}
    if "teacher_forwards" in cost:
        row["teacher_fwd"] = float(cost["teacher_forwards"])
    if cfg.online_teacher:
        row["cache_gb"] = 0.0
    elif url is not None:
        cache = FeatureCache.open(url)
        stored = int(cache.meta.view["views_per_image"])
        used = min(int(cost.get("views") or getattr(cfg, "cache_views", 0) or stored), stored)
        row["cache_gb"] = cache.nbytes_stored() * used / stored / 1e9
    return row


def validate_stages(spec: PipelineSpec) -> None:
    """Build every stage's options once before the first stage runs (issue 11): a misspelt key in
    any section is one line at once, not after the teacher and caches took hours."""
    for name in spec.cache_options:
        label = "cache" if name == DEFAULT_CACHE and not spec.caches else f"caches.{name}"
        _extract_config(spec, spec.cache_options[name], spec.data, None, cache_url(spec, name), label)
        if spec.heldout:
            _extract_config(spec, heldout_options(spec, name), spec.heldout["data"], None, "heldout", "heldout")
    runs = [r for r in spec.runs() if not r.get("scratch")]
    for run in runs:
        distill_config(spec, run, "cache", "classifier", None)
    if any(is_supervised(spec, r) for r in runs):
        classifier_config(spec, None)


def mark_random_teacher(spec: PipelineSpec, rows: list[dict[str, Any]]) -> str:
    """The report's title; a teacher without weights (``random_init: true``) is said there and in
    every row's description."""
    if not spec.teacher.get("random_init"):
        return spec.name
    for row in rows:
        row["description"] = f"{row.get('description') or ''} [random-init teacher]".strip()
    return f"{spec.name} [random-init teacher: no trained weights]"


def run_pipeline(spec: PipelineSpec) -> dict[str, Path]:
    """All stages in order; returns the paths of results.csv/.md/.png (and frontier.png)."""
    validate_stages(spec)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    resolve_builtin(spec)
    checkpoint = stage_teacher(spec)
    runs = spec.runs()
    trained = [r for r in runs if not r.get("scratch")]
    supervised = [r for r in trained if is_supervised(spec, r)]
    cached = [r for r in trained if r not in supervised and not r.get("online")]
    keys = list(dict.fromkeys(spec.cache_key(r) for r in cached))
    caches = {key: stage_cache(spec, checkpoint, *key) for key in keys}
    mim = [r for r in trained if r not in supervised]
    heldout = stage_heldout(spec, checkpoint, list(dict.fromkeys(spec.cache_name(r) for r in mim))) \
        if spec.heldout and mim else {}
    classifier = stage_classifier_teacher(spec, checkpoint) if supervised else None

    def url(run: dict[str, Any]) -> str | None:
        """A cached run's cache; an online run's twin (its cache, when extracted for cached runs)."""
        return caches.get(spec.cache_key(run)) if run in cached or (run in mim and run.get("online")) else None

    announce(f"distill: {len(trained)} runs")
    models = {}
    with stage_bar(len(runs), "distill", "run") as bar:
        for run in runs:
            models[run["name"]] = stage_distill(spec, run, url(run), classifier, checkpoint)
            bar.update(1)
    announce(f"evaluate: {len(runs)} runs x {len(spec.eval.tasks)} tasks {spec.eval.tasks}"
             + (f" + fidelity on held-out views of {spec.heldout['data']}" if heldout else ""))
    rows = [teacher_row(classifier)] if classifier else []
    n_fidelity = len(mim) if heldout else 0
    with stage_bar(len(runs) * len(spec.eval.tasks) + n_fidelity, "evaluate", "eval") as bar:
        for run in runs:
            row = {"variant": run["variant"], "run": run["name"], "description": run.get("description", "")}
            row.update(stage_eval(spec, run, models[run["name"]], bar))
            if run in mim and heldout:
                row.update(stage_fidelity(spec, run, heldout[spec.cache_name(run)]))
                bar.update(1)
            if run in trained:
                row.update(run_costs(spec, run, url(run)))
            if spec.eval.test and run in supervised:
                row.update(stage_classifier_eval(spec, run))
            rows.append(row)
    paths = write_report(rows, spec.out_dir, mark_random_teacher(spec, rows))
    if mim:
        announce("sweep cost: the caches once, every run, and the same sweep with a live teacher (timed)")
        configs = {caches[key]: _extract_config(spec, cache_options(spec, *key), spec.data, checkpoint, caches[key])
                   for key in keys}
        cost = sweep_cost(spec.out_dir, {r["name"]: url(r) if r in cached else None for r in mim}, configs)
        paths["sweep_cost"] = spec.out_dir / SWEEP_COST_FILE
        with paths["md"].open("a") as f:
            f.write(sweep_cost_line(cost))
    return paths


def sweep_cost_line(cost: dict[str, Any]) -> str:
    """The sweep-cost sentence under the results table."""
    if cost["p7"] is None:
        return f"\nSweep cost: {cost['note']}.\n"
    extraction = sum(c["extraction_seconds"] for c in cost["caches"].values())
    return (f"\nSweep cost: {cost['cached_sweep_seconds']:,.0f} s with the caches ({extraction:,.0f} s extracting "
            f"{cost['cached_teacher_forwards']:,} teacher forwards once) against {cost['live_sweep_seconds']:,.0f} s "
            f"with a live teacher ({cost['live_teacher_forwards']:,} forwards): P7 = {cost['p7']:.3f} "
            f"(`sweep_cost.json`).\n")
