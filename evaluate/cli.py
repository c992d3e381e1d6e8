"""``hgkd-evaluate``: kNN, linear/MLP probe and fine-tuning of a student as a dense timm model.

    hgkd-evaluate knn      --model student.safetensors --train 'train-{000..009}.tar' --test val.tar --out knn.json
    hgkd-evaluate linear   --model runs/hgkd-r50 --train imagefolder/ --head mlp --out mlp.json
    hgkd-evaluate finetune --model scratch:resnet50 --train data.tar --test-fraction 0.2 --epochs 5 --out ft.json
    hgkd-evaluate detection --model student.safetensors --train instances_train2017.json --train-images train2017/ \
        --test instances_val2017.json --test-images val2017/ --out coco.json

Each command writes one JSON record and prints one summary line. Images are read and decoded
batch by batch (``--workers``); kNN and probes train from a feature cache (``--features-dir``).
``torchrun --nproc_per_node N -m hgkd.evaluate.cli finetune ...`` (or ``detection``) fine-tunes
with DDP; rank 0 writes the record. ``detection`` fine-tunes Faster/Mask R-CNN on COCO-format
data (default: the embedded digit set), prints COCOeval's AP table and writes the detections
beside the record.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import click

from ..config import default_of
from ..errors import HgkdError, user_errors
from ..registry import PROBE_HEAD_NAMES
from .detection_recipe import AUTO, DETECTORS, NORMS, RECIPES, DetectionRecipe
from .option_ranges import ranged  # one-line range errors (issue 21)


@click.group()
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool) -> None:
    """Evaluate a distilled student (exported .safetensors, run directory, or scratch:<arch>)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", required=True,
                     help="student.safetensors, a distillation run directory, or scratch:<timm arch>."),
        click.option("--train", multiple=True, required=True,
                     help="Labelled training data: tar shards (cls members) or an image folder."),
        click.option("--test", multiple=True,
                     help="Labelled test data; without it --test-fraction of --train is held out."),
        click.option("--test-fraction", type=ranged("test_fraction"), default=0.25,
                     show_default=True),
        click.option("--img-size", type=ranged("img_size"), default=224, show_default=True),
        click.option("--crop-pct", type=ranged("crop_pct"), default=0.875, show_default=True,
                     help="Eval transform: resize shorter side to img_size/crop_pct, center-crop img_size."),
        click.option("--batch-size", type=ranged("batch_size"), default=64, show_default=True),
        click.option("--workers", type=ranged("workers"), default=0, show_default=True,
                     help="DataLoader worker processes that read and decode images."),
        click.option("--features-dir", type=click.Path(file_okay=False),
                     help="Keep frozen features here (Zarr feature cache), reused by later kNN/probe runs of the "
                          "same model, data and view recipe; default: a temporary folder."),
        click.option("--memory-mb", type=ranged("memory_mb"), default=2048, show_default=True,
                     help="A probe loads its features whole up to this size, else reads them from the feature cache "
                          "in shuffled blocks every epoch."),
        click.option("--seed", type=ranged("seed"), default=0, show_default=True),
        click.option("--device", default="auto", show_default=True),
        click.option("--out", required=True, type=click.Path(dir_okay=False), help="Results JSON file."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run(task: str, out: str, model: str, train: tuple[str, ...], test: tuple[str, ...], **opts: Any) -> None:
    from .tasks import run_task, summary_line

    given = {name: value for name, value in opts.items() if value is not None}  # unset: the task's default
    record = run_task(task, model, list(train), list(test) or None, **given)
    _write(record, out, lambda path: f"{summary_line(record)} -> {path}")


def _write(record: dict[str, Any], out: str, summary: Callable[[Path], str]) -> None:
    """Rank 0 (torchrun) or the only process writes the record and prints its summary."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    click.echo(summary(path))


@main.command()
@common_options
@click.option("--k", type=ranged("k"), default=20, show_default=True)
@click.option("--temperature", type=ranged("temperature"), default=0.07, show_default=True)
@user_errors
def knn(**opts: Any) -> None:
    """Weighted kNN (cosine similarity, exp(sim/T) votes) on frozen features."""
    _run("knn", **opts)


@main.command()
@common_options
@click.option("--head", type=click.Choice(PROBE_HEAD_NAMES), default="mlp", show_default=True,
              help="mlp: the paper's Linear-ReLU-Linear head; linear: one Linear layer.")
@click.option("--epochs", type=ranged("epochs"), default=100, show_default=True)
@click.option("--lr", type=ranged("lr"), default=1e-3, show_default=True)
@click.option("--weight-decay", type=ranged("weight_decay"), default=1e-4, show_default=True)
@click.option("--hidden", type=ranged("hidden"), help="MLP hidden width (default: the feature width).")
@click.option("--probe-batch-size", type=ranged("probe_batch_size"), default=256, show_default=True)
@user_errors
def linear(head: str, **opts: Any) -> None:
    """Train a probe head on frozen, standardised features (AdamW, cross-entropy)."""
    _run(head, **opts)


@main.command()
@common_options
@click.option("--epochs", type=ranged("epochs"), default=10, show_default=True)
@click.option("--lr", type=ranged("lr"), default=5e-4, show_default=True)
@click.option("--weight-decay", type=ranged("weight_decay"), default=0.05, show_default=True)
@click.option("--hidden", type=ranged("hidden"), help="MLP hidden width (default: the feature width).")
@click.option("--min-scale", type=ranged("min_scale"), default=0.08, show_default=True,
              help="RandomResizedCrop's smallest area fraction (0.08: ImageNet; 0.3-0.5 for small low-res sets).")
@click.option("--labels-per-class", type=ranged("labels_per_class"),
              help="Train on this many labelled images per class only, drawn with --seed (the semi-supervised "
                   "protocol); default: every label.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False),
              help="Where SIGTERM/SIGUSR1 leave the run's checkpoint (finetune.pt). Default: <out>.ckpt/ beside --out.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint a stop signal left, exactly where it stopped.")
@user_errors
def finetune(checkpoint_dir: str | None, **opts: Any) -> None:
    """Fine-tune backbone + MLP head end to end on augmented images (AdamW, cosine); SIGTERM/SIGUSR1 stop it
    with a checkpoint (exit 75) that --resume continues."""
    from .detection_checkpoint import default_dir

    _run("finetune", checkpoint_dir=checkpoint_dir or default_dir(opts["out"]), **opts)


def _recipe(name: str) -> Any:
    value = default_of(DetectionRecipe, name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _about(name: str, text: str = "") -> str:
    """Help of a recipe option: unset, it takes --recipe's value; the 1x value is shown."""
    return f"{text} [1x: {_recipe(name)}]".strip()


def _int_list(option: str, text: str | None, length: int | None = None) -> list[int] | None:
    """``--train-sizes 640,672,800`` -> [640, 672, 800]; one line when not integers."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HgkdError(f"{option} {text!r}: expected comma-separated integers, e.g. {_recipe('train_sizes')}") \
            from None
    if length is not None and len(values) != length:
        raise HgkdError(f"{option} {text!r}: expected {length} comma-separated integers")
    return values


@main.command()
@click.option("--model", required=True, help="student.safetensors, a distillation run directory, scratch:<timm arch>, "
                                              "or supervised:<timm arch>:<ImageNet weight file>.")
@click.option("--train", default="builtin:digit-detection-train", show_default=True,
              help="COCO instances JSON (local or URL); builtin:digit-detection-train is the embedded digit set.")
@click.option("--train-images", help="The folder of --train's images (local or URL).")
@click.option("--test", default="builtin:digit-detection-val", show_default=True,
              help="COCO instances JSON to score on; builtin:digit-detection-val with the embedded set.")
@click.option("--test-images", help="The folder of --test's images.")
@click.option("--recipe", type=click.Choice([AUTO, *RECIPES]), default=AUTO, show_default=True,
              help="Named recipe the options below override: 1x (COCO's standard schedule), digits (the embedded set "
                   "on CPU); auto: digits on the embedded set, else 1x.")
@click.option("--detector", type=click.Choice(DETECTORS), help=_about("detector", "maskrcnn: box and mask AP; "
                                                                                 "fasterrcnn: box AP."))
@click.option("--norm", type=click.Choice(NORMS), help=_about(
    "norm", "syncbn: BN trained in trunk, FPN and heads (SyncBN under DDP on CUDA), nothing frozen - the "
            "self-supervised protocol; frozen: detectron2's frozen BN, stem and res2 frozen."))
@click.option("--epochs", type=ranged("epochs"), help=_about("epochs"))
@click.option("--batch-size", type=ranged("batch_size", detection=True),
              help=_about("batch_size", "Images per step, all ranks."))
@click.option("--lr", type=ranged("lr", detection=True), help=_about("lr", "SGD lr per 16 images, scaled "
                                                                                 "linearly to --batch-size."))
@click.option("--momentum", type=ranged("momentum", detection=True), help=_about("momentum"))
@click.option("--weight-decay", type=ranged("weight_decay"), help=_about("weight_decay"))
@click.option("--warmup-iters", type=ranged("warmup_iters", detection=True), help=_about("warmup_iters"))
@click.option("--lr-steps", help=_about("lr_steps", "Epochs after which the lr is divided by 10."))
@click.option("--train-sizes", help=_about("train_sizes", "Training short sides, one drawn per image."))
@click.option("--test-size", type=ranged("test_size", detection=True), help=_about("test_size"))
@click.option("--max-size", type=ranged("max_size", detection=True),
              help=_about("max_size", "Longest side at most this."))
@click.option("--flip", type=ranged("flip", detection=True), help=_about("flip", "Horizontal-flip probability."))
@click.option("--width", type=ranged("width", detection=True), help=_about("width", "FPN and head channels."))
@click.option("--rois-per-image", type=ranged("rois_per_image", detection=True), help=_about("rois_per_image"))
@click.option("--proposals", help=_about("proposals", "RPN proposals per image after NMS: train,test."))
@click.option("--detections-per-image", type=ranged("detections_per_image", detection=True),
              help=_about("detections_per_image"))
@click.option("--workers", type=ranged("workers"), default=0, show_default=True,
              help="DataLoader worker processes that read and decode images.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), help="Default: <out>.ckpt/ beside --out.")
@click.option("--checkpoint-every", type=ranged("checkpoint_every", detection=True), default=0, show_default=True,
              help="Iterations between checkpoints (0: at epoch ends only).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint, exactly where it stopped.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--seed", type=ranged("seed"), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Results JSON; the detections go beside it (<out>.bbox.json, <out>.segm.json).")
@user_errors
def detection(model: str, train: str, test: str, lr_steps: str | None, train_sizes: str | None,
              proposals: str | None, out: str, **opts: Any) -> None:
    """Fine-tune Faster/Mask R-CNN with an FPN on the trunk (COCO 1x recipe) and score it with COCOeval."""
    from .detection import detection_task, summary_table

    record = detection_task(model, train, test, out=out, lr_steps=_int_list("--lr-steps", lr_steps),
                            train_sizes=_int_list("--train-sizes", train_sizes),
                            proposals=_int_list("--proposals", proposals, 2), **opts)
    _write(record, out, lambda path: f"{summary_table(record)}\n-> {path}")


if __name__ == "__main__":
    main()
