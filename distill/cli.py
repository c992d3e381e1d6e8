"""``hgkd-distill``: train the student from a teacher cache (stage two), export it dense."""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import click
from click.core import ParameterSource

import yaml

from .. import remote
from ..config import default_of
from ..data.view_config import DECODERS, GRANULARITIES, TEACHER_VIEWS
from ..errors import HgkdError, user_errors
from ..ranges import Ranged, at_least
from ..registry import METHOD_NAMES, STUDENT_NAMES, TEACHER_NAMES
from .config import (NONFINITE_ACTIONS, RESUME_MODES, SPARSE_BACKENDS, STUDENT_MASKS, DistillConfig, TeacherConfig,
                     load_yaml)

# Option defaults are read from the config dataclasses (one home per default, issue 14).
RUN, TEACHER = partial(default_of, DistillConfig), partial(default_of, TeacherConfig)


def parse_method_opts(items: tuple[str, ...]) -> dict:
    """``--method-opt key=value`` (repeatable); values are YAML (numbers, lists, booleans)."""
    opts = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise HgkdError(f"--method-opt {item!r}: expected key=value, e.g. --method-opt kd_weight=1")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return opts


@click.group()
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool) -> None:
    """Distil a cached MIM teacher into a sparse CNN student (H-GKD stage two)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options; CLI options override it.")
@click.option("--cache", help="Teacher cache written by 'hgkd-extract run'.")
@click.option("--data", multiple=True, help="The data the cache was made from (same shards/folder).")
@click.option("--out", help="Run directory (checkpoints, metrics, config).")
@click.option("--method", type=click.Choice(METHOD_NAMES), default=RUN("method"), show_default=True,
              help="Distillation method; all but hgkd are supervised baselines needing --teacher-classifier.")
@click.option("--method-opt", "method_opts", multiple=True, metavar="KEY=VALUE",
              help="A hyper-parameter of --method (repeatable), e.g. kd_weight=1 for ICD+KD.")
@click.option("--teacher-classifier", type=click.Path(dir_okay=False),
              help="Baselines: classifier teacher written by 'hgkd-distill teacher'.")
@click.option("--optimizer", default=RUN("optimizer"), show_default=True, help="timm optimizer name.")
@click.option("--views-per-image", type=int, default=RUN("views_per_image"), show_default=True,
              help="Baselines: views cycled over epochs (0: a fresh view every epoch).")
@click.option("--student", type=click.Choice(STUDENT_NAMES), default=RUN("student"), show_default=True)
@click.option("--sparse-backend", type=click.Choice(SPARSE_BACKENDS), default=RUN("sparse_backend"), show_default=True)
@click.option("--sparse/--no-sparse", default=RUN("sparse"), show_default=True, help="Ablation: sparse vs ordinary convs.")
@click.option("--unet/--no-unet", default=RUN("unet"), show_default=True, help="Ablation: UNet decoder vs plain head.")
@click.option("--similarity/--no-similarity", default=RUN("similarity"), show_default=True, help="Ablation: with/without L_sim.")
@click.option("--epochs", type=int, default=RUN("epochs"), show_default=True)
@click.option("--warmup-epochs", type=int,
              help="Default: the paper's 40, scaled to 40/100 of --epochs (with a warning) when that exceeds them.")
@click.option("--batch-size", type=int, default=RUN("batch_size"), show_default=True, help="Global batch size.")
@click.option("--lr", type=float, default=RUN("lr"), show_default=True)
@click.option("--weight-decay", type=float, default=RUN("weight_decay"), show_default=True)
@click.option("--clip-grad", type=float, default=RUN("clip_grad"), show_default=True)
@click.option("--queue-size", type=int, default=RUN("queue_size"), show_default=True)
@click.option("--tau", type=float, default=RUN("tau"), show_default=True)
@click.option("--sim-weight", type=float, default=RUN("sim_weight"), show_default=True)
@click.option("--decoder-width", type=int, default=RUN("decoder_width"), show_default=True)
@click.option("--seed", type=int, default=RUN("seed"), show_default=True)
@click.option("--workers", type=int, default=RUN("workers"), show_default=True)
@click.option("--device", default=RUN("device"), show_default=True)
@click.option("--decoder", type=click.Choice(("cache", *DECODERS)), default=RUN("decoder"), show_default=True,
              help="What renders the cached views: 'cache' = the decoder that made the teacher's pixels; the run "
                   "first checks a few views against the pixels the cache kept.")
@click.option("--allow-decoder-mismatch", is_flag=True, default=RUN("allow_decoder_mismatch"),
              help="Train although this run's pixels differ from the teacher's (a warning instead of an error).")
@click.option("--checkpoint-every", type=int, default=RUN("checkpoint_every"), show_default=True, help="Steps between checkpoints (0: epoch ends).")
@click.option("--online-teacher", metavar="NAME",
              help=f"Run this teacher on every batch instead of reading --cache: {', '.join(TEACHER_NAMES)}.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), help="Checkpoint of --online-teacher.")
@click.option("--img-size", type=int, default=RUN("img_size"), show_default=True,
              help="Online teacher only (a cache records its own).")
@click.option("--mask-ratio", type=float, default=RUN("mask_ratio"), show_default=True, help="Online teacher only.")
@click.option("--mask-granularity", type=click.Choice([str(g) for g in GRANULARITIES]),
              default=str(RUN("mask_granularity")), show_default=True, help="Online teacher only.")
@click.option("--teacher-view", type=click.Choice(TEACHER_VIEWS), default=RUN("teacher_view"), show_default=True,
              help="Online teacher only: 'full' shows the teacher the unmasked view.")
@click.option("--online-views", type=int, default=RUN("online_views"), show_default=True,
              help="Online teacher: views cycled over epochs (view e mod K, as a K-view cache); 0: a fresh view "
                   "every epoch.")
@click.option("--cache-views", type=int, default=RUN("cache_views"), show_default=True,
              help="Use views 0..K-1 of the cache (epoch e shows view e mod K); 0: every view it holds.")
@click.option("--student-mask", type=click.Choice(STUDENT_MASKS), default=RUN("student_mask"), show_default=True,
              help="'fresh': a new student mask every epoch (needs full-view teacher targets).")
@click.option("--remote-retries", type=int, default=RUN("remote_retries"),
              help="Retries of a transient fault of a --data/--cache URL (reset, timeout, HTTP 429/5xx, short "
                   "body); default $HGKD_REMOTE_RETRIES or 8.")
@click.option("--remote-retry-seconds", type=float, default=RUN("remote_retry_seconds"),
              help="Total seconds one remote read may spend retrying; default $HGKD_REMOTE_RETRY_SECONDS or 120.")
@click.option("--nonfinite", type=click.Choice(NONFINITE_ACTIONS), default=RUN("nonfinite"), show_default=True,
              help="A step whose loss or gradient norm is not finite is never applied; 'stop': the run stops with "
                   "one line naming it, 'skip': it is skipped and counted (metrics column skipped_steps).")
@click.option("--resume", type=click.Choice(RESUME_MODES), is_flag=False, flag_value="always", default="never",
              show_default=True,
              help="auto: continue the run in --out when it holds a checkpoint, start it when not (one command for "
                   "job scripts, requeues and torchrun --max-restarts); always (a bare --resume): continue, a "
                   "missing checkpoint is an error; never: refuse an --out holding a run.")
@user_errors
def run(config_file: str | None, resume: str, **opts) -> None:
    """Train the student against the cached teacher targets.

    SIGTERM or SIGUSR1 (preemption) stops it at the next step with a checkpoint, one
    'stopped:' line and exit code 75; the same command with --resume auto continues it.
    """
    from .methods import METHODS, method_class
    from .train import Trainer, make_dir

    ctx = click.get_current_context()
    values = load_yaml(config_file) if config_file else {}
    opts["method_opts"] = parse_method_opts(opts["method_opts"])
    for name, value in opts.items():
        if ctx.get_parameter_source(name) != ParameterSource.DEFAULT or name not in values:
            values[name] = list(value) if name == "data" else value
    values["mask_granularity"] = int(values["mask_granularity"])
    method = values.get("method", DistillConfig.method)
    reads_cache = method in METHODS and not method_class(method).supervised and not values.get("online_teacher")
    for required in ("cache", "data", "out") if reads_cache else ("data", "out"):
        if not values.get(required):
            raise HgkdError(f"--{required} is required (on the command line or in --config)")
    given = {name for name in opts if ctx.get_parameter_source(name) != ParameterSource.DEFAULT}  # errors: --name
    cfg = DistillConfig.from_dict(values, source=config_file or "options", options=given)
    remote.configure(cfg.remote_retries, cfg.remote_retry_seconds)  # before any read; forked workers inherit it
    trainer = Trainer(cfg, resume=resume)
    make_dir(Path(cfg.out), "--out")  # a bad --out is the one line printed, before the run's notes
    if trainer.dist.main and cfg.sparse:
        click.echo(f"sparse backend: {trainer.backend_choice.name} ({trainer.backend_choice.reason})", err=True)
    if trainer.dist.main and getattr(trainer.targets, "pixel_check", None):
        click.echo(trainer.targets.pixel_check, err=True)
    history = trainer.fit()
    skipped = f", {trainer.skipped_steps} non-finite steps skipped" if cfg.nonfinite == "skip" else ""
    if history:
        last = history[-1]
        terms = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in (
            "loss", "lr", "grad_norm", "img_per_s", "epoch", "step", "skipped_steps", "remote_retries"))
        click.echo(f"{cfg.out}: {last['step']:.0f} steps, final loss {last['loss']:.4f} ({terms}){skipped}")
    else:
        click.echo(f"{cfg.out}: already trained to epoch {trainer.epoch} ({trainer.global_step} steps){skipped}")


@main.command()
@click.option("--data", multiple=True, required=True, help="Labelled training data (tars with .cls, or class folders).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file (.pt).")
@click.option("--arch", required=True, metavar="NAME",
              help=f"A student encoder ({', '.join(STUDENT_NAMES)}) or a ViT teacher ({', '.join(TEACHER_NAMES)}).")
@click.option("--init-checkpoint", type=click.Path(dir_okay=False), help="ViT: start from this MIM checkpoint.")
@click.option("--num-classes", type=int, default=TEACHER("num_classes"), show_default=True, help="0: largest label + 1.")
@click.option("--img-size", type=int, default=TEACHER("img_size"), show_default=True)
@click.option("--branches/--no-branches", default=TEACHER("branches"), show_default=True,
              help="HSAKD: train auxiliary rotation/joint-label branches with the teacher.")
@click.option("--epochs", type=int, default=TEACHER("epochs"), show_default=True)
@click.option("--warmup-epochs", type=int, default=TEACHER("warmup_epochs"), show_default=True)
@click.option("--batch-size", type=int, default=TEACHER("batch_size"), show_default=True)
@click.option("--lr", type=float, default=TEACHER("lr"), show_default=True)
@click.option("--weight-decay", type=float, default=TEACHER("weight_decay"), show_default=True)
@click.option("--optimizer", default=TEACHER("optimizer"), show_default=True)
@click.option("--seed", type=int, default=TEACHER("seed"), show_default=True)
@click.option("--workers", type=int, default=TEACHER("workers"), show_default=True)
@click.option("--device", default=TEACHER("device"), show_default=True)
@click.option("--test-data", multiple=True, help="Held-out labelled data: report the teacher's top-1.")
@user_errors
def teacher(**opts) -> None:
    """Train the classifier teacher of the supervised baselines (KD, ICD, HSAKD, ...)."""
    from .teacher_train import train_teacher

    opts["data"], opts["test_data"] = list(opts["data"]), list(opts["test_data"])
    result = train_teacher(TeacherConfig(**opts))
    top1 = f", held-out top-1 {result['test_top1']:.2f}%" if "test_top1" in result else ""
    click.echo(f"{opts['out']}: classifier teacher {opts['arch']}, final train loss {result['train_loss']:.4f}{top1}")


EXPORT_FORMATS = ("timm", "torchvision", "detectron2")  # hgkd.distill.students.export.FORMATS
LOADS_WITH = {"timm": "timm.create_model('{arch}', num_classes=0).load_state_dict(safetensors.torch.load_file(...))",
              "torchvision": "torchvision.models.{arch}().load_state_dict(torch.load(...), strict=False): all but fc",
              "detectron2": "MODEL.WEIGHTS in a detectron2 config (matching_heuristics)"}


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, help="Output file: .safetensors (timm), .pth (torchvision), .pkl (detectron2).")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="timm", show_default=True,
              help="timm: safetensors with the architecture; torchvision: torch.save'd state dict (also "
                   "mmdetection's); detectron2: its pickle with detectron2's ResNet names.")
@user_errors
def export(run_dir: str, out: str, fmt: str) -> None:
    """Write the student's encoder as dense ResNet weights for timm, torchvision/mmdetection or detectron2."""
    import tempfile

    from safetensors.torch import load_file

    from .export_run import export_run
    from .students.export import save_format

    if fmt == "timm":
        arch = export_run(Path(run_dir), Path(out))
    else:
        with tempfile.TemporaryDirectory(prefix="hgkd-export-") as tmp:
            arch = export_run(Path(run_dir), Path(tmp) / "student.safetensors")
            state = load_file(str(Path(tmp) / "student.safetensors"))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_format(state, out, fmt)
    click.echo(f"{out}: {fmt} '{arch}' weights (load with {LOADS_WITH[fmt].format(arch=arch)})")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--cache", required=True, help="Cache of held-out views from the same teacher.")
@click.option("--data", multiple=True, required=True, help="The data that cache was made from.")
@click.option("--max-views", type=Ranged(at_least(1)), default=None, help="Default: every view of the cache.")
@user_errors
def fidelity(run_dir: str, cache: str, data: tuple[str, ...], max_views: int | None) -> None:
    """Token cosine and relative MSE of the student's output against the teacher's tokens."""
    from .fidelity import fidelity as measure

    result = measure(Path(run_dir), cache, list(data), max_views=max_views)
    click.echo(f"{run_dir}: token cosine {result['token_cosine']:.4f}, relative MSE {result['relative_mse']:.4f} "
               f"over {result['views']} views ({result['tokens']} tokens)")


if __name__ == "__main__":
    main()
