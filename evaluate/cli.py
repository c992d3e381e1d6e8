"""``hgkd-evaluate``: kNN, linear/MLP probe and fine-tuning of a student as a dense timm model.

    hgkd-evaluate knn      --model student.safetensors --train 'train-{000..009}.tar' --test val.tar --out knn.json
    hgkd-evaluate linear   --model runs/hgkd-r50 --train imagefolder/ --head mlp --out mlp.json
    hgkd-evaluate finetune --model scratch:resnet50 --train data.tar --test-fraction 0.2 --epochs 5 --out ft.json

Each command writes one JSON record and prints one summary line. Images are read and decoded
batch by batch (``--workers``); kNN and probes train from a feature cache (``--features-dir``).
``torchrun --nproc_per_node N -m hgkd.evaluate.cli finetune ...`` fine-tunes with DDP; rank 0
writes the record.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import user_errors
from ..registry import PROBE_HEAD_NAMES


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
        click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25,
                     show_default=True),
        click.option("--img-size", type=click.IntRange(min=8), default=224, show_default=True),
        click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True), default=0.875, show_default=True,
                     help="Eval transform: resize shorter side to img_size/crop_pct, center-crop img_size."),
        click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="DataLoader worker processes that read and decode images."),
        click.option("--features-dir", type=click.Path(file_okay=False),
                     help="Keep frozen features here (Zarr feature cache), reused by later kNN/probe runs of the "
                          "same model, data and view recipe; default: a temporary folder."),
        click.option("--memory-mb", type=click.FloatRange(0, min_open=True), default=2048, show_default=True,
                     help="A probe loads its features whole up to this size, else reads them from the feature cache "
                          "in shuffled blocks every epoch."),
        click.option("--seed", type=int, default=0, show_default=True),
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
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 writes the record
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    click.echo(f"{summary_line(record)} -> {path}")


@main.command()
@common_options
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.07, show_default=True)
@user_errors
def knn(**opts: Any) -> None:
    """Weighted kNN (cosine similarity, exp(sim/T) votes) on frozen features."""
    _run("knn", **opts)


@main.command()
@common_options
@click.option("--head", type=click.Choice(PROBE_HEAD_NAMES), default="mlp", show_default=True,
              help="mlp: the paper's Linear-ReLU-Linear head; linear: one Linear layer.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), help="MLP hidden width (default: the feature width).")
@click.option("--probe-batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@user_errors
def linear(head: str, **opts: Any) -> None:
    """Train a probe head on frozen, standardised features (AdamW, cross-entropy)."""
    _run(head, **opts)


@main.command()
@common_options
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), help="MLP hidden width (default: the feature width).")
@click.option("--min-scale", type=click.FloatRange(0, 1, min_open=True), default=0.08, show_default=True,
              help="RandomResizedCrop's smallest area fraction (0.08: ImageNet; 0.3-0.5 for small low-res sets).")
@user_errors
def finetune(**opts: Any) -> None:
    """Fine-tune backbone + MLP head end to end on augmented images (AdamW, cosine)."""
    _run("finetune", **opts)


if __name__ == "__main__":
    main()
