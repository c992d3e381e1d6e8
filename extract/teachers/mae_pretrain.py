"""A small MAE pre-training (He et al. 2022) for making a teacher where none can be downloaded.

Used by the demo pipeline: no pretrained MIM weights are reachable from these machines, so a
tiny MAE ViT is pre-trained on the demo images first. The decoder and loss follow MAE:
visible-only encoder, a narrow decoder over all positions with a learned mask token and
fixed sin-cos positions, MSE on per-patch-normalised pixels of the hidden patches.
Checkpoints are written in MAE's official key layout (``{'model': ..., 'epoch': ...}`` with
``decoder_*`` keys) so the regular teacher loader reads them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from tqdm import tqdm

from ...pixels import normalize_uint8, pixel_stats
from .base import TEACHERS, Teacher
from .layers import sincos_pos_embed_2d

log = logging.getLogger(__name__)


class MaeDecoder(nn.Module):
    """MAE's light decoder; parameter names are the official ``decoder_*`` keys."""

    def __init__(self, teacher: Teacher, dim: int = 64, depth: int = 1, heads: int = 2) -> None:
        super().__init__()
        p, grid = teacher.patch_size, teacher.grid_size
        self.decoder_embed = nn.Linear(teacher.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(grid, dim, "col"))  # (1, 1+N, dim)
        self.decoder_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=2.0, qkv_bias=True) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, p * p * 3)

    def forward(self, tokens_bnc: Tensor, mask_bn: Tensor) -> Tensor:
        """Encoder tokens (zeros where hidden) -> predicted pixels per patch (B, N, p*p*3)."""
        x = self.decoder_embed(tokens_bnc)
        x = torch.where(mask_bn.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + self.decoder_pos_embed[:, 1:]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))


def patchify(images_bchw: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3) in MAE's (row, col, channel) patch order."""
    b, c, h, w = images_bchw.shape
    x = images_bchw.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_loss(teacher: Teacher, decoder: MaeDecoder, images_bchw: Tensor, mask_bn: Tensor) -> Tensor:
    """MSE on per-patch-normalised pixels of the hidden patches (MAE, norm_pix_loss=True)."""
    tokens_bnc, _ = teacher.forward_masked(images_bchw, mask_bn)
    pred = decoder(tokens_bnc, mask_bn)
    target = patchify(images_bchw, teacher.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)
    return (per_patch * mask_bn).sum() / mask_bn.sum().clamp_min(1)


def random_masks(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    n_hidden = int(round(ratio * num_patches))
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    return torch.zeros(batch, num_patches, dtype=torch.bool).scatter_(1, order[:, :n_hidden], True)


def pretrain_mae(teacher_name: str, images_bchw: Tensor, out: Path, epochs: int = 20, batch_size: int = 64,
                 lr: float = 1.5e-3, mask_ratio: float = 0.75, seed: int = 0, **teacher_kwargs) -> Path:
    """Pre-train ``teacher_name`` (an MAE family entry) on uint8 images; write the checkpoint."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher = TEACHERS.get(teacher_name)(img_size=images_bchw.shape[-1], **teacher_kwargs)
    if teacher.family != "mae":
        raise ValueError(f"pretrain_mae needs an MAE teacher, got {teacher_name} ({teacher.family})")
    decoder = MaeDecoder(teacher)
    params = list(teacher.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    steps = epochs * -(-len(images_bchw) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    mean, std = pixel_stats(teacher.mean, teacher.std)
    teacher.train()
    bar = tqdm(range(epochs), desc="MAE pre-training", leave=False)
    for _ in bar:
        order = torch.randperm(len(images_bchw), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = images_bchw[order[start : start + batch_size]].float()
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            mask = random_masks(len(batch), teacher.num_patches, mask_ratio, generator)
            loss = mae_loss(teacher, decoder, normalize_uint8(batch, mean, std), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    state = {**teacher.state_dict(), **{k: v for k, v in decoder.state_dict().items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": epochs}, out)
    log.info("MAE pre-training done: final loss %.4f -> %s", loss.item(), out)
    return out
