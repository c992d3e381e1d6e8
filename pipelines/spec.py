"""Pipeline files: a teacher, its caches, N distillation variants, their evaluations (YAML).

```yaml
name: ablation_table5
out: runs/table5
data: ['/data/imagenet/train-{0000..0255}.tar']      # what the teacher and students see
teacher: {name: cae_large_patch16, checkpoint: /ckpt/cae_large_1600ep.pth}
cache: {mask_ratio: 0.6, views_per_image: 1}        # hgkd-extract run options
distill: {student: resnet50, epochs: 100}           # hgkd-distill run options, for every variant
eval: {train: [...], test: [...], tasks: [knn, linear], img_size: 224}   # tasks: hgkd.evaluate.registry
variants:
  - {name: full, seed: 0}
  - {name: wo_unet, unet: false, seed: 0}
  - {name: kd, method: kd}                          # a supervised baseline (needs classifier_teacher)
  - {name: scratch, scratch: true}                  # untrained student: the floor
classifier_teacher: {epochs: 10, branches: true}    # hgkd-distill teacher options; arch = teacher.name
```
The teacher's weights come from ``checkpoint`` or ``pretrain_mae``; a randomly initialised
teacher must be asked for with ``random_init: true`` (and is marked in the results). Every
section's keys are checked before the first stage runs (``pipelines.run.validate_stages``).
``eval`` may also set ``features_dir`` (the frozen-feature cache, default ``<out>/features``),
``workers`` (image-decoding DataLoader workers) and ``memory_mb`` (feature memory of a probe);
its tasks and their ``options`` are checked against ``hgkd.evaluate``'s task registry.
``--set section.key=value`` overrides any entry from the command line. Data entries
``builtin:digits-train`` / ``builtin:digits-test`` are the shipped digits (``builtin`` section:
``img_size``, ``max_images``), written under ``out/data`` on first use.

Sweeps over the views budget (issue 12) add:

```yaml
caches:                                  # several caches of one teacher (instead of 'cache')
  masked: {views_per_image: 8, mask_ratio: 0.5}
  full: {views_per_image: 2, mask_ratio: 0.5, teacher_view: full}
heldout: {data: [builtin:digits-test], views_per_image: 1}   # fidelity column (hgkd.distill.fidelity)
variants:
  - {name: k2, cache: masked, cache_views: 2, seeds: [0, 1, 2]}   # one run per seed, mean +- std
  - {name: online, online: masked, seeds: [0, 1, 2]}              # the teacher live, views as in 'masked'
```
A variant's ``cache`` names one of ``caches`` (default: the first); ``online: true`` (or a
cache name whose view settings it takes) runs the pipeline's own teacher live instead;
``seeds`` expands a variant into runs ``<name>-s<seed>``. ``heldout`` extracts, for each
distinct view setting used, a cache of the held-out data with the same teacher and view
settings (its own options override them), on which every H-GKD student's token cosine is
measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import load_mapping, unknown_keys
from ..distill.config import TEACHER_RANGES
from ..errors import HgkdError
from ..evaluate.option_ranges import IMAGE_RANGES, task_ranges
from ..evaluate.registry import TASKS as EVAL_TASKS
from ..extract.config import RANGES as EXTRACT_RANGES
from ..extract.config import VIEW_RANGES
from ..ranges import IMG_SIZE_MAX, Range, at_least, check_ranges

DEFAULT_CACHE = "default"  # the name of a pipeline's single ``cache``
TEACHER_KEYS = ("name", "checkpoint", "img_size", "pretrain_mae", "random_init")
# Numeric entries checked when the file is read (issue 21), named by the file and their section; the
# distillation variants are checked by DistillConfig.from_dict (pipelines.run.validate_stages) the same way.
TEACHER_IMG = {"img_size": at_least(16, IMG_SIZE_MAX)}
BUILTIN_RANGES = {"img_size": at_least(8, IMG_SIZE_MAX), "max_images": at_least(1)}
CACHE_RANGES: dict[str, Range] = {**EXTRACT_RANGES, **VIEW_RANGES}


@dataclass
class EvalSpec:
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    test_fraction: float = 0.25  # used when no test set is given
    tasks: list[str] = field(default_factory=lambda: ["knn", "mlp"])
    img_size: int = 224
    # per-task options, e.g. {finetune: {epochs: 5}}; an entry with 'task' is a named instance of that task
    # with its own options, listed in 'tasks' by its name: {finetune_10: {task: finetune, labels_per_class: 10}}
    options: dict[str, Any] = field(default_factory=dict)
    features_dir: str | None = None  # the frozen-feature cache; default <out>/features
    workers: int = 0  # DataLoader workers decoding images
    memory_mb: float = 2048  # probes and kNN load at most this much of the feature cache

    def task_of(self, name: str) -> tuple[str, dict[str, Any]]:
        """The registered task an entry of ``tasks`` runs, and its options."""
        opts = dict(self.options.get(name) or {})
        return opts.pop("task", name), opts

    def check(self, source: str) -> None:
        """Tasks and their options against ``hgkd.evaluate``'s task registry."""
        names = EVAL_TASKS.names()
        bad = [t for t in dict.fromkeys([*self.tasks, *self.options]) if self.task_of(t)[0] not in EVAL_TASKS]
        if bad:
            raise HgkdError(f"{source}: unknown eval tasks {bad}; choose from {names} (or name one in options "
                            f"with 'task')")
        for name in self.options:
            task, opts = self.task_of(name)
            unknown = sorted(set(opts) - EVAL_TASKS.get(task).options)
            if unknown:
                raise HgkdError(f"{source}: eval options of {name}: unknown {unknown}; "
                                f"it takes {sorted(EVAL_TASKS.get(task).options)}")


@dataclass
class PipelineSpec:
    name: str
    out: str
    data: list[str]
    teacher: dict[str, Any]
    variants: list[dict[str, Any]]
    cache: dict[str, Any] = field(default_factory=dict)
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    classifier_teacher: dict[str, Any] = field(default_factory=dict)
    builtin: dict[str, Any] = field(default_factory=dict)
    # a variant with 'seeds' reads a cache drawn with its seed (its views' seed = the run's): seeds then
    # vary the views as an online run's seeds do (issue 22); false: every seed reads the one cache
    cache_per_seed: bool = True
    # claims named before the run (issue 22): {name, candidate, reference, metric, min_ratio, max_cost};
    # judged over the paired seeds of the two variants by benchmarks/views_budget.py
    claims: list[dict[str, Any]] = field(default_factory=list)
    source: str = "<spec>"

    def __post_init__(self) -> None:
        names = [v.get("name") for v in self.variants]
        if not names or not all(names) or len(set(names)) != len(names):
            raise HgkdError(f"{self.source}: every variant needs a unique 'name' (got {names})")
        self.eval.check(self.source)
        self.check_claims()
        if self.eval.features_dir is None:
            self.eval.features_dir = str(Path(self.out) / "features")
        if "name" not in self.teacher:
            raise HgkdError(f"{self.source}: 'teacher' needs a 'name' (a registered teacher)")
        self._check_teacher()
        if self.cache and self.caches:
            raise HgkdError(f"{self.source}: give either 'cache' or 'caches' (named caches), not both")
        if not all(isinstance(v, dict) for v in self.caches.values()):
            raise HgkdError(f"{self.source}: 'caches' maps names to hgkd-extract options, "
                            "e.g. masked: {views_per_image: 8}")
        if self.heldout and not self.heldout.get("data"):
            raise HgkdError(f"{self.source}: 'heldout' needs 'data' (the held-out images of the fidelity cache)")
        for variant in self.variants:
            self._check_variant(variant)
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Every numeric entry of the teacher, builtin data, caches, classifier teacher and evaluation
        against the range its command takes: ``pipeline.yaml: eval.options.knn: k: 0 must be at least 1``."""
        def check(section: str, values: dict[str, Any], ranges: dict[str, Range]) -> None:
            check_ranges(values, ranges, lambda key: f"{self.source}: {section}: {key}:")

        check("teacher", self.teacher, TEACHER_IMG)
        check("builtin", self.builtin, BUILTIN_RANGES)
        for name, options in self.cache_options.items():
            check("cache" if name == DEFAULT_CACHE and not self.caches else f"caches.{name}", options, CACHE_RANGES)
        check("heldout", self.heldout, CACHE_RANGES)
        check("classifier_teacher", self.classifier_teacher, TEACHER_RANGES)
        ev = self.eval
        check("eval", {"test_fraction": ev.test_fraction, "img_size": ev.img_size, "workers": ev.workers,
                       "memory_mb": ev.memory_mb}, IMAGE_RANGES)
        for name in self.eval.options:
            task, opts = self.eval.task_of(name)
            check(f"eval.options.{name}", opts, task_ranges(task))

    def _check_teacher(self) -> None:
        """Known keys only; no checkpoint (nor MAE pre-training) only with an explicit ``random_init: true``."""
        unknown = set(self.teacher) - set(TEACHER_KEYS)
        if unknown:
            raise HgkdError(f"{self.source}: teacher: {unknown_keys(unknown, TEACHER_KEYS)}")
        given = self.teacher.get("checkpoint") or self.teacher.get("pretrain_mae")
        if not given and self.teacher.get("random_init") is not True:
            raise HgkdError(f"{self.source}: teacher: give 'checkpoint' (or 'pretrain_mae'); a randomly initialised "
                            "teacher only with 'random_init: true'")
        if given and self.teacher.get("random_init"):
            raise HgkdError(f"{self.source}: teacher: 'random_init: true' contradicts 'checkpoint'/'pretrain_mae'")

    def _check_variant(self, variant: dict[str, Any]) -> None:
        where = f"{self.source}: variant {variant['name']}"
        names = list(self.cache_options)
        for key in ("cache", "online"):
            value = variant.get(key)
            if isinstance(value, str) and value not in names:
                raise HgkdError(f"{where}: {key}: {value!r} is not one of the caches {names}")
        if "cache" in variant and not isinstance(variant["cache"], str):
            raise HgkdError(f"{where}: 'cache' names one of the caches {names}")
        if variant.get("online") and "cache" in variant:
            raise HgkdError(f"{where}: an online variant reads no cache; give 'online: <cache name>' for its views")
        seeds = variant.get("seeds")
        if seeds is not None:
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
                    or len(set(seeds)) != len(seeds):
                raise HgkdError(f"{where}: 'seeds' must be a list of distinct integers (got {seeds!r})")
            if "seed" in variant:
                raise HgkdError(f"{where}: give 'seed' or 'seeds', not both")

    @property
    def cache_options(self) -> dict[str, dict[str, Any]]:
        """Every cache by name: ``caches``, or the single ``cache`` as ``default``."""
        return dict(self.caches) if self.caches else {DEFAULT_CACHE: dict(self.cache)}

    def cache_name(self, variant: dict[str, Any]) -> str:
        """The cache a variant trains on (online: whose view settings it uses)."""
        chosen = variant.get("online") if variant.get("online") is not True else None
        return chosen or variant.get("cache") or next(iter(self.cache_options))

    def check_claims(self) -> None:
        """Each claim names two variants, a metric and its bounds (issue 22: named before the run)."""
        needed = {"name", "candidate", "reference", "metric", "min_ratio", "max_cost"}
        variants = {v["name"]: v for v in self.variants}
        for claim in self.claims:
            where = f"{self.source}: claim {claim.get('name')!r}" if isinstance(claim, dict) else f"{self.source}: claims"
            if not isinstance(claim, dict) or set(claim) != needed:
                raise HgkdError(f"{where}: give exactly {', '.join(sorted(needed))}")
            for role in ("candidate", "reference"):
                if claim[role] not in variants:
                    raise HgkdError(f"{where}: {role} {claim[role]!r} is not a variant")
            if variants[claim["candidate"]].get("seeds") != variants[claim["reference"]].get("seeds"):
                raise HgkdError(f"{where}: candidate and reference need the same seeds (the comparison is paired)")

    def cache_key(self, run: dict[str, Any]) -> tuple[str, int | None]:
        """(cache name, view seed) a run trains on: a run of a variant with ``seeds`` gets the cache
        drawn with its seed when ``cache_per_seed``; None: the cache's own settings."""
        seed = run.get("seed") if run.get("per_seed") and self.cache_per_seed else None
        return self.cache_name(run), seed

    def runs(self) -> list[dict[str, Any]]:
        """The variants with ``seeds`` expanded: one run per seed, named ``<name>-s<seed>``, marked
        ``per_seed``; every run carries ``variant`` (the row it is aggregated into)."""
        runs = []
        for variant in self.variants:
            seeds = variant.get("seeds")
            base = {k: v for k, v in variant.items() if k != "seeds"}
            if seeds is None:
                runs.append({**base, "variant": variant["name"]})
            else:
                runs += [{**base, "name": f"{variant['name']}-s{s}", "variant": variant["name"], "seed": s,
                          "per_seed": True} for s in seeds]
        return runs

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


def _apply_override(blob: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise HgkdError(f"--set {assignment!r}: expected section.key=value")
    node = blob
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSpec:
    """Read and validate a pipeline file; one clear line for any problem."""
    blob = load_mapping(path, path)
    for assignment in overrides:
        _apply_override(blob, assignment)
    return spec_from_dict(blob, source=path)


def spec_from_dict(blob: dict[str, Any], source: str = "<spec>") -> PipelineSpec:
    known = {f.name for f in fields(PipelineSpec)} - {"source"}
    unknown = sorted(set(blob) - known)
    missing = sorted({"name", "out", "data", "teacher", "variants"} - set(blob))
    if unknown or missing:
        raise HgkdError(f"{source}: " + "; ".join(
            ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])))
    eval_blob = blob.get("eval") or {}
    eval_unknown = sorted(set(eval_blob) - {f.name for f in fields(EvalSpec)})
    if eval_unknown:
        raise HgkdError(f"{source}: unknown eval keys {eval_unknown}")
    data = blob["data"] if isinstance(blob["data"], list) else [blob["data"]]
    return PipelineSpec(**{**blob, "data": data, "eval": EvalSpec(**eval_blob)}, source=source)
