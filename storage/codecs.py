"""Token codecs: how teacher tokens are stored, and the numcodecs compressors behind them.

Measured choices are in ``shared/notes/cache-storage.md`` and ``benchmarks/extract.py``:
- ``bf16`` keeps bfloat16 bits as uint16 (cosine 1 - 1.4e-6, ~290 KB/view for 196x1024);
- ``int8t`` quantizes per token (cosine 1 - 3e-5) but collapses when a teacher has a few
  huge outlier channels (cosine 0.98 on the other channels);
- ``int8ct`` (default) first divides each channel by its per-view max, then quantizes per
  token: same size as ``int8t`` (~188 KB/view), robust to outlier channels.

Encoding runs in torch on whatever device the tokens are on (numpy conversions are the slow
path); decoding returns numpy float32 or a torch tensor. A new codec is one ``TokenCodec``
entry in ``CODECS``. numpy, torch and zarr are imported where they are used, so the codec names and
:class:`CodecSpec`'s defaults are read by ``hgkd-extract --help`` without them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from typing import TYPE_CHECKING

from ..errors import HgkdError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from zarr.abc.codec import BytesBytesCodec

_INT8_MAX = 127.0
_EPS = 1e-12

AuxArrays = dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class TokenCodec:
    """One way of storing tokens: the stored dtype, side arrays, and the encode/decode pair."""

    name: str
    token_dtype: str
    encode: Callable[[torch.Tensor], dict[str, np.ndarray]]  # float32 (B, N, C) -> stored arrays
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # stored arrays as tensors -> float32 (B, N, C), same device
    aux_arrays: Callable[[int, int], AuxArrays] = lambda num_tokens, dim: {}  # (N, C) -> side arrays


def _encode_int8(x: torch.Tensor, per_channel: bool) -> dict[str, np.ndarray]:
    import torch

    out: dict[str, np.ndarray] = {}
    if per_channel:
        channel_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(_EPS).half()
        x = x / channel_scale.float()
        out["channel_scale"] = channel_scale.squeeze(1).cpu().numpy()
    token_scale = x.abs().amax(dim=2, keepdim=True).clamp_min(_EPS)
    q = torch.round(x / token_scale * _INT8_MAX).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    out["tokens"] = q.cpu().numpy()
    out["token_scale"] = token_scale.squeeze(2).cpu().numpy()
    return out


def _decode_int8(arrays: dict[str, torch.Tensor], per_channel: bool) -> torch.Tensor:
    x = arrays["tokens"].float()  # a new tensor: scale it in place
    x.mul_((arrays["token_scale"].float() / _INT8_MAX).unsqueeze(-1))
    if per_channel:
        x.mul_(arrays["channel_scale"].float().unsqueeze(1))
    return x


def _bf16_encode(x: torch.Tensor) -> dict[str, np.ndarray]:
    import numpy as np
    import torch

    return {"tokens": x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)}


def _bf16_decode(arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    return arrays["tokens"].view(torch.bfloat16).float()  # stored uint16 bits, carried as int16 (token_tensors)


# The codec registry: a new codec is one entry (hgkd-extract --help lists its name from here).
CODECS: dict[str, TokenCodec] = {c.name: c for c in (
    TokenCodec("f32", "float32", lambda x: {"tokens": x.cpu().numpy()}, lambda a: a["tokens"].float()),
    TokenCodec("f16", "float16", lambda x: {"tokens": x.half().cpu().numpy()}, lambda a: a["tokens"].float()),
    TokenCodec("bf16", "uint16", _bf16_encode, _bf16_decode),
    TokenCodec("int8t", "int8", lambda x: _encode_int8(x, False), lambda a: _decode_int8(a, False),
               lambda n, c: {"token_scale": ((n,), "float32")}),
    TokenCodec("int8ct", "int8", lambda x: _encode_int8(x, True), lambda a: _decode_int8(a, True),
               lambda n, c: {"token_scale": ((n,), "float32"), "channel_scale": ((c,), "float16")}),
)}
TOKEN_CODECS = tuple(CODECS)
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
    def token_codec(self) -> TokenCodec:
        return CODECS[self.codec]

    @property
    def token_dtype(self) -> str:
        return self.token_codec.token_dtype

    def aux_arrays(self, num_tokens: int, dim: int) -> AuxArrays:
        """Per-view side arrays the codec needs: name -> (shape without N, dtype)."""
        return self.token_codec.aux_arrays(num_tokens, dim)

    def compressors(self, typesize: int) -> list[BytesBytesCodec]:
        """numcodecs-backed compressor chain for one chunk, ending in a crc32c checksum."""
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

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
    return spec.token_codec.encode(tokens_bnc.detach().float())


def token_tensors(arrays: dict[str, np.ndarray], spec: CodecSpec) -> dict[str, torch.Tensor]:
    """The stored token arrays (``tokens`` + side arrays) as CPU tensors, still encoded: what a
    loader worker hands to the trainer (int8 is a quarter of float32 across the process
    boundary, issue 20) for :func:`decode_token_tensors` on the device."""
    import numpy as np
    import torch

    names = ["tokens", *spec.aux_arrays(1, 1)]
    out = {}
    for name in names:
        stored = np.ascontiguousarray(arrays[name])
        out[name] = torch.from_numpy(stored.view(np.int16) if stored.dtype == np.uint16 else stored)
    return out


def decode_token_tensors(tensors: dict[str, torch.Tensor], spec: CodecSpec) -> torch.Tensor:
    """Float32 tokens (B, N, C) from :func:`token_tensors`, on the tensors' device."""
    return spec.token_codec.decode(tensors)


def decode_tokens(arrays: dict[str, np.ndarray], spec: CodecSpec) -> torch.Tensor:
    """Inverse of :func:`encode_tokens`: float32 tokens (B, N, C) as a CPU tensor."""
    return decode_token_tensors(token_tensors(arrays, spec), spec)
