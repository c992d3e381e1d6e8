"""Densify + light UNet decoder of the H-GKD student (Sec. 3.2.1, Fig. 3; SparK's design).

The encoder's four sparse maps (strides 4, 8, 16, 32) are densified: empty sites get a
learned per-scale mask embedding, then a 1x1 projection per scale maps encoder widths to
decoder widths. Three up-sampling blocks fuse the scales coarse-to-fine (UNet skips); a
final strided convolution projects to the teacher's token grid and width (e.g.
1024 x 14 x 14). ``unet=False`` is the ablation head: the same three blocks without the
skip inputs, fed by the deepest scale only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Densify(nn.Module):
    """Fill inactive sites with a learned embedding, then project to the decoder width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, feat_bchw: Tensor, active_bhw: Tensor) -> Tensor:
        active = active_bhw.unsqueeze(1)
        return self.proj(torch.where(active, feat_bchw, self.mask_embedding.to(feat_bchw.dtype)))


class UpBlock(nn.Module):
    """x2 transposed-conv up-sampling, optional skip add, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x_bchw: Tensor, skip_bchw: Tensor | None = None) -> Tensor:
        x = self.up(x_bchw)
        return self.convs(x if skip_bchw is None else x + skip_bchw)


class LightDecoder(nn.Module):
    """Four densified scales -> teacher-shaped map (B, out_dim, H/patch, W/patch)."""

    def __init__(self, encoder_channels: list[int], out_dim: int, patch_size: int = 16,
                 width: int = 512, unet: bool = True) -> None:
        super().__init__()
        if patch_size % 4:
            raise ValueError(f"teacher patch size {patch_size} must be a multiple of the stem stride 4")
        self.unet = unet
        widths = [width >> i for i in range(4)][::-1]  # decoder width per scale, fine -> coarse
        scales = range(4) if unet else [3]
        self.densify = nn.ModuleDict({str(i): Densify(encoder_channels[i], widths[i]) for i in scales})
        self.blocks = nn.ModuleList(UpBlock(widths[i], widths[i - 1]) for i in (3, 2, 1))
        k = patch_size // 4  # decoder ends at stride 4; the teacher grid is at stride patch_size
        self.proj = nn.Conv2d(widths[0], out_dim, kernel_size=k, stride=k)

    def forward(self, features: list[tuple[Tensor, Tensor]]) -> Tensor:
        x = self.densify["3"](*features[3])
        for block, scale in zip(self.blocks, (2, 1, 0)):
            skip = self.densify[str(scale)](*features[scale]) if self.unet else None
            x = block(x, skip)
        return self.proj(x)
