"""Token codecs: fidelity per codec, and int8ct's robustness to outlier channels."""
import pytest
import torch

from hgkd.storage.codecs import TOKEN_CODECS, CodecSpec, decode_tokens, encode_tokens
from hgkd.errors import HgkdError

# minimum mean token cosine per codec (shared/notes/cache-storage.md measurements)
MIN_COSINE = {"f32": 1.0 - 1e-7, "f16": 1.0 - 1e-6, "bf16": 1.0 - 1e-4, "int8t": 0.9999, "int8ct": 0.9999}


def tokens(outliers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 49, 256, generator=g) * (0.5 + torch.rand(256, generator=g))
    if outliers:  # a few huge channels, as pretrained ViTs commonly have
        x[..., :2] *= 100
    return x


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1).mean().item()


@pytest.mark.parametrize("codec", TOKEN_CODECS)
def test_codec_roundtrip_fidelity(codec):
    x = tokens(outliers=False)
    spec = CodecSpec(codec)
    stored = encode_tokens(x, spec)
    assert stored["tokens"].dtype.name == spec.token_dtype
    assert set(stored) == {"tokens", *spec.aux_arrays(49, 256)}
    decoded = decode_tokens(stored, spec)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert mean_cosine(x, decoded) >= MIN_COSINE[codec]


def test_int8ct_survives_outlier_channels_where_int8t_does_not():
    x = tokens(outliers=True)
    rest = slice(2, None)
    per_token = decode_tokens(encode_tokens(x, CodecSpec("int8t")), CodecSpec("int8t"))
    per_channel = decode_tokens(encode_tokens(x, CodecSpec("int8ct")), CodecSpec("int8ct"))
    assert mean_cosine(x[..., rest], per_channel[..., rest]) > 0.9999
    assert mean_cosine(x[..., rest], per_token[..., rest]) < 0.99


def test_unknown_codec_is_a_user_error():
    with pytest.raises(HgkdError, match="--codec"):
        CodecSpec("int4")
