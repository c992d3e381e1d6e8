"""``hgkd-pipeline demo``: the whole loop on real labelled images shipped in a package.

scikit-learn's handwritten digits (no download) at 64 px. No pretrained MIM weights are
reachable here, so a mini MAE ViT is pre-trained on the training split first; then one
cache, an H-GKD sparse ResNet-18 and the same ResNet-18 without distillation (random
init), both evaluated by kNN, an MLP probe on frozen features and fine-tuning.
"""
from __future__ import annotations

from pathlib import Path

from ..extract.demo_data import write_digits_shards
from .spec import PipelineSpec, spec_from_dict


def demo_spec(out: Path) -> PipelineSpec:
    train, test = write_digits_shards(out / "data", img_size=64)
    return spec_from_dict({
        "name": "H-GKD demo (digits, 64 px): MAE mini-ViT teacher -> sparse ResNet-18",
        "out": str(out),
        "data": [train],
        "teacher": {"name": "mae_vit_mini_patch16", "img_size": 64,
                    "pretrain_mae": {"epochs": 40, "mask_ratio": 0.5, "batch_size": 64}},
        "cache": {"views_per_image": 2, "mask_ratio": 0.5, "shard_views": 256, "batch_size": 128},
        "distill": {"student": "resnet18", "sparse_backend": "masked", "epochs": 6, "warmup_epochs": 1,
                    "batch_size": 64, "lr": 2e-3, "queue_size": 4096, "decoder_width": 128, "workers": 1},
        "eval": {"train": [train], "test": [test], "tasks": ["knn", "mlp", "finetune"], "img_size": 64,
                 "options": {"finetune": {"epochs": 3}}},
        "variants": [
            {"name": "hgkd", "description": "sparse ResNet-18 distilled with H-GKD (MSE + similarity)"},
            {"name": "scratch", "scratch": True, "description": "same ResNet-18, random init, no distillation"},
        ],
    }, source="hgkd-pipeline demo")
