"""Token codecs: how teacher tokens are stored, and the numcodecs compressors behind them.

Measured choices are in ``shared/notes/cache-storage.md`` and ``benchmarks/extract.py``:
- ``bf16`` keeps bfloat16 bits as uint16 (cosine 1 - 1.4e-6, ~290 KB/view for 196x1024);
- ``int8t`` quantizes per token (cosine 1 - 3e-5) but collapses when a teacher has a few
  huge outlier channels (cosine 0.98 on the other channels);
- ``int8ct`` (default) first divides each channel by its per-view max, then quantizes per
  token: same size as ``int8t`` (~188 KB/view), robust to outlier channels.

Encoding runs in torch on whatever device the tokens are on (numpy conversions are the slow
path); decoding returns numpy float32 or a torch tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import HgkdError

_INT8_MAX = 127.0
_EPS = 1e-12

TOKEN_CODECS = ("f32", "f16", "bf16", "int8t", "int8ct")
COMPRESSORS = ("lz4", "zstd", "none")


@dataclass(frozen=True)
class CodecSpec:
    """How ``tokens`` are stored: element codec plus the chunk compressor (with crc32c)."""

    codec: str = "int8ct"
    compressor: str = "lz4"
    clevel: int = 5

    def __post_init__(self) -> None:
        if self.codec not in TOKEN_CODECS:
            raise HgkdError(f"--codec {self.codec!r} is unknown; choose one of {', '.join(TOKEN_CODECS)}")
        if self.compressor not in COMPRESSORS:
            raise HgkdError(
                f"--compressor {self.compressor!r} is unknown; choose one of {', '.join(COMPRESSORS)}"
            )

    @property
    def token_dtype(self) -> str:
        return {"f32": "float32", "f16": "float16", "bf16": "uint16"}.get(self.codec, "int8")

    def aux_arrays(self, num_tokens: int, dim: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-view side arrays the codec needs: name -> (shape without N, dtype)."""
        if self.codec == "int8t":
            return {"token_scale": ((num_tokens,), "float32")}
        if self.codec == "int8ct":
            return {"token_scale": ((num_tokens,), "float32"), "channel_scale": ((dim,), "float16")}
        return {}

    def compressors(self, typesize: int) -> list[BytesBytesCodec]:
        """numcodecs-backed compressor chain for one chunk, ending in a crc32c checksum."""
        chain: list[BytesBytesCodec] = []
        if self.compressor == "lz4":
            shuffle = "bitshuffle" if typesize > 1 else "shuffle"
            chain.append(BloscCodec(cname="lz4", clevel=self.clevel, shuffle=shuffle, typesize=typesize))
        elif self.compressor == "zstd":
            chain.append(ZstdCodec(level=self.clevel))
        chain.append(Crc32cCodec())
        return chain


def encode_tokens(tokens_bnc: torch.Tensor, spec: CodecSpec) -> dict[str, np.ndarray]:
    """Encode float tokens (B, N, C) into the stored arrays (``tokens`` + side arrays)."""
    x = tokens_bnc.detach().float()
    if spec.codec == "f32":
        return {"tokens": x.cpu().numpy()}
    if spec.codec == "f16":
        return {"tokens": x.half().cpu().numpy()}
    if spec.codec == "bf16":
        bits = x.to(torch.bfloat16).view(torch.int16).cpu().numpy()
        return {"tokens": bits.view(np.uint16)}
    out: dict[str, np.ndarray] = {}
    if spec.codec == "int8ct":
        channel_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(_EPS).half()
        x = x / channel_scale.float()
        out["channel_scale"] = channel_scale.squeeze(1).cpu().numpy()
    token_scale = x.abs().amax(dim=2, keepdim=True).clamp_min(_EPS)
    q = torch.round(x / token_scale * _INT8_MAX).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    out["tokens"] = q.cpu().numpy()
    out["token_scale"] = token_scale.squeeze(2).cpu().numpy()
    return out


def decode_tokens(arrays: dict[str, np.ndarray], spec: CodecSpec) -> torch.Tensor:
    """Inverse of :func:`encode_tokens`: float32 tokens (B, N, C) as a CPU tensor."""
    stored = arrays["tokens"]
    if spec.codec in ("f32", "f16"):
        return torch.from_numpy(np.ascontiguousarray(stored)).float()
    if spec.codec == "bf16":
        bits = torch.from_numpy(np.ascontiguousarray(stored).view(np.int16))
        return bits.view(torch.bfloat16).float()
    x = torch.from_numpy(np.ascontiguousarray(stored)).float()  # a new tensor: scale it in place
    x.mul_((torch.from_numpy(arrays["token_scale"]).float() / _INT8_MAX).unsqueeze(-1))
    if spec.codec == "int8ct":
        x.mul_(torch.from_numpy(arrays["channel_scale"]).float().unsqueeze(1))
    return x
