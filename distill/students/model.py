"""The H-GKD student: sparse ResNet encoder + densify/UNet decoder -> teacher token grid."""
from __future__ import annotations

from torch import Tensor, nn

from ..outputs import NetOutputs
from .decoder import LightDecoder


class HgkdStudent(nn.Module):
    """``forward(images, visible) -> tokens_bnc`` shaped like the cached teacher tokens."""

    def __init__(self, encoder: nn.Module, out_dim: int, patch_size: int = 16,
                 decoder_width: int = 512, unet: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = LightDecoder(list(encoder.channels), out_dim, patch_size, decoder_width, unet)

    def forward_features(self, images_bchw: Tensor, visible_bhw: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Four sparse stage outputs ``(feat_bchw, active_bhw)`` at strides 4, 8, 16, 32."""
        return self.encoder.forward_features(images_bchw, visible_bhw)

    def forward_outputs(self, images_bchw: Tensor, visible_bhw: Tensor) -> NetOutputs:
        """The prediction as the record distillation methods read (``tokens``)."""
        return NetOutputs(tokens=self(images_bchw, visible_bhw))

    def forward(self, images_bchw: Tensor, visible_bhw: Tensor) -> Tensor:
        out_bchw = self.decoder(self.forward_features(images_bchw, visible_bhw))
        return out_bchw.flatten(2).transpose(1, 2)  # (B, h*w, C) like the teacher's tokens
