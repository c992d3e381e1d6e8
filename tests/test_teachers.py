"""Tests for the frozen MIM teachers (hgkd.extract.teachers): masked-view semantics per family
(MAE: He et al. 2022; BEiT: Bao et al. 2021; CAE: Chen et al. 2022), official checkpoint
layouts, and safe checkpoint loading. CPU only, tiny configs, no mocks."""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from hgkd.errors import HgkdError
from hgkd.extract.teachers import (
    Teacher,
    create_teacher,
    list_teachers,
    load_checkpoint_file,
    sha256_file,
)

TINY = [name for name in list_teachers() if "_tiny_" in name]
BATCH, MASK_RATIO = 2, 0.75


def _by_family(*families: str) -> list[str]:
    return [n for n in TINY if create_teacher(n).family in families]


def _images(teacher: Teacher, seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, teacher.img_size, teacher.img_size, generator=g)


def _random_mask(teacher: Teacher, seed: int = 0, batch: int = BATCH,
                 ratio: float = MASK_RATIO) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = teacher.num_patches
    order_bn = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    return order_bn < int(round(n * ratio))


def _run(teacher: Teacher, images: torch.Tensor, mask: torch.Tensor | None):
    with torch.no_grad():
        return teacher.forward_masked(images, mask)


def _pixel_mask(teacher: Teacher, mask_bn: torch.Tensor) -> torch.Tensor:
    """Per-pixel view of a patch mask, (B, 1, H, W)."""
    h, w = teacher.grid_size
    mask_bhw = mask_bn.reshape(-1, 1, h, w).float()
    return F.interpolate(mask_bhw, scale_factor=teacher.patch_size, mode="nearest").bool()


# ---------------------------------------------------------------- registry and interface

def test_registry_has_large_and_tiny_of_each_family():
    names = set(list_teachers())
    assert {"mae_vit_large_patch16", "beit_large_patch16", "cae_large_patch16"} <= names
    assert set(TINY) == {"mae_vit_tiny_patch16", "beit_tiny_patch16", "cae_tiny_patch16"}


def test_unknown_teacher_is_a_user_error():
    with pytest.raises(HgkdError, match="unknown teacher 'vit_nope'"):
        create_teacher("vit_nope")


@pytest.mark.parametrize("name", TINY)
def test_created_teacher_is_frozen_and_describes_itself(name):
    teacher = create_teacher(name)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.teacher_name == name and teacher.family in ("mae", "beit", "cae")
    assert (teacher.patch_size, teacher.img_size, teacher.grid_size) == (16, 224, (14, 14))
    assert teacher.embed_dim == 64 and len(teacher.mean) == len(teacher.std) == 3
    assert teacher.outputs_masked_tokens == (teacher.family != "mae")


@pytest.mark.parametrize("name", TINY)
def test_forward_masked_shapes_and_validity(name):
    teacher = create_teacher(name)
    mask_bn = _random_mask(teacher)
    tokens_bnc, valid_bn = _run(teacher, _images(teacher), mask_bn)
    assert tokens_bnc.shape == (BATCH, 196, teacher.embed_dim)
    assert tokens_bnc.dtype == torch.float32 and valid_bn.dtype == torch.bool
    assert torch.isfinite(tokens_bnc).all()
    if teacher.family == "mae":
        assert torch.equal(valid_bn, ~mask_bn)
        assert (tokens_bnc[mask_bn] == 0).all()
        assert (tokens_bnc[~mask_bn].abs().sum(-1) > 0).all()
    else:
        assert valid_bn.all()


@pytest.mark.parametrize("name", TINY)
def test_full_view_gives_all_valid_tokens(name):
    teacher = create_teacher(name)
    tokens_bnc, valid_bn = _run(teacher, _images(teacher), None)
    assert tokens_bnc.shape == (BATCH, 196, teacher.embed_dim) and valid_bn.all()
    no_mask = torch.zeros(BATCH, 196, dtype=torch.bool)
    assert torch.allclose(_run(teacher, _images(teacher), no_mask)[0], tokens_bnc, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_unequal_visible_counts_match_per_sample_forward(name):
    teacher = create_teacher(name)
    images = _images(teacher, batch=3)
    mask_bn = torch.cat([_random_mask(teacher, seed=s, batch=1, ratio=r)
                         for s, r in ((1, 0.75), (2, 0.5), (3, 0.6))])
    tokens_bnc, valid_bn = _run(teacher, images, mask_bn)
    for i in range(3):
        one_tokens, one_valid = _run(teacher, images[i:i + 1], mask_bn[i:i + 1])
        assert torch.allclose(tokens_bnc[i:i + 1], one_tokens, atol=1e-5)
        assert torch.equal(valid_bn[i:i + 1], one_valid)


@pytest.mark.parametrize("name", _by_family("beit", "cae"))
def test_masking_changes_outputs_at_masked_positions(name):
    teacher = create_teacher(name)
    images, mask_bn = _images(teacher), _random_mask(teacher)
    masked_tokens, _ = _run(teacher, images, mask_bn)
    full_tokens, _ = _run(teacher, images, None)
    diff_b = (masked_tokens - full_tokens)[mask_bn].abs().amax(-1)
    assert (diff_b > 1e-4).all()


@pytest.mark.parametrize("name", _by_family("mae", "cae"))
def test_visible_tokens_ignore_pixels_of_masked_patches(name):
    """Visible-only encoders (MAE, CAE) never see hidden pixels: changing them must not
    change any visible token."""
    teacher = create_teacher(name)
    images, mask_bn = _images(teacher), _random_mask(teacher)
    noise = 5 * torch.randn_like(images)
    perturbed = torch.where(_pixel_mask(teacher, mask_bn), images + noise, images)
    before, _ = _run(teacher, images, mask_bn)
    after, _ = _run(teacher, perturbed, mask_bn)
    assert torch.allclose(before[~mask_bn], after[~mask_bn], atol=1e-6)


def test_beit_sees_masked_pixels_only_through_the_mask_token():
    teacher = create_teacher("beit_tiny_patch16")
    images, mask_bn = _images(teacher), _random_mask(teacher)
    perturbed = torch.where(_pixel_mask(teacher, mask_bn), -images, images)
    assert torch.allclose(_run(teacher, images, mask_bn)[0],
                          _run(teacher, perturbed, mask_bn)[0], atol=1e-6)


@pytest.mark.parametrize("name", _by_family("mae", "beit"))
def test_full_view_matches_timm_forward_features(name):
    teacher = create_teacher(name)
    images = _images(teacher)
    timm_class = {"mae": VisionTransformer, "beit": Beit}[teacher.family]
    with torch.no_grad():
        expected = timm_class.forward_features(teacher, images)[:, 1:]
    assert torch.allclose(_run(teacher, images, None)[0], expected, atol=1e-5)


# ---------------------------------------------------------------- CAE against a reference

def _official_cae_sincos(grid: int, dim: int) -> torch.Tensor:
    """CAE's `build_2d_sincos_position_embedding` re-derived: (w, h) meshgrid, 'ij' order."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                    torch.arange(grid, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega
    out_h = grid_h.flatten()[:, None] * omega
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb])[None]


def _official_mae_sincos(grid: int, dim: int) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed(..., cls_token=True)` re-derived with numpy."""
    coords = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32),
                                  np.arange(grid, dtype=np.float32)))

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(dim // 2, coords[0]), one_axis(dim // 2, coords[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb])[None]


def test_fixed_position_tables_follow_the_official_formulas():
    mae = create_teacher("mae_vit_tiny_patch16")
    cae = create_teacher("cae_tiny_patch16")
    assert np.allclose(mae.pos_embed.numpy(), _official_mae_sincos(14, 64), atol=1e-6)
    assert torch.allclose(cae.encoder.pos_embed, _official_cae_sincos(14, 64), atol=1e-6)
    assert torch.allclose(cae.regressor_pos_embed, _official_cae_sincos(14, 64), atol=1e-6)


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _mlp(x, sd, p):
    hidden = F.gelu(F.linear(x, sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"]))
    return F.linear(hidden, sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"])


def _attention(q_in, k_in, v_in, w, bias_q, bias_v, proj, sd, heads):
    q, k, v = F.linear(q_in, w[0], bias_q), F.linear(k_in, w[1]), F.linear(v_in, w[2], bias_v)
    split = [t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3) for t in (q, k, v)]
    weights = (split[0] * split[0].shape[-1] ** -0.5) @ split[1].transpose(-2, -1)
    out = (weights.softmax(-1) @ split[2]).permute(0, 2, 1, 3).flatten(2)
    return F.linear(out, sd[f"{proj}.weight"], sd[f"{proj}.bias"])


def _reference_cae(teacher, images, mask):
    """CAE's encoder + latent regressor written out from the paper / official code with
    boolean indexing and explicit softmax attention, reading weights by official name."""
    sd, batch = teacher.state_dict(), images.shape[0]
    heads = teacher.encoder.blocks[0].attn.num_heads
    x = F.conv2d(images, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"],
                 stride=16).flatten(2).transpose(1, 2)
    dim = x.shape[-1]
    pos = sd["encoder.pos_embed"].expand(batch, -1, -1)
    cls = sd["encoder.cls_token"].expand(batch, -1, -1)
    x = torch.cat([cls, x[~mask].reshape(batch, -1, dim)], 1)
    x = x + torch.cat([pos[:, :1], pos[:, 1:][~mask].reshape(batch, -1, dim)], 1)
    for i in range(len(teacher.encoder.blocks)):
        p = f"encoder.blocks.{i}"
        h = _ln(x, sd, f"{p}.norm1")
        attn = _attention(h, h, h, sd[f"{p}.attn.qkv.weight"].chunk(3), sd[f"{p}.attn.q_bias"],
                          sd[f"{p}.attn.v_bias"], f"{p}.attn.proj", sd, heads)
        x = x + sd[f"{p}.gamma_1"] * attn
        x = x + sd[f"{p}.gamma_2"] * _mlp(_ln(x, sd, f"{p}.norm2"), sd, f"{p}.mlp")
    unmasked = _ln(x, sd, "encoder.norm")[:, 1:]
    rpos = _official_cae_sincos(14, dim).expand(batch, -1, -1)[:, 1:]
    pos_m, pos_u = rpos[mask].reshape(batch, -1, dim), rpos[~mask].reshape(batch, -1, dim)
    masked = sd["mask_token"].expand(batch, pos_m.shape[1], -1)
    rheads = teacher.regressor.regressor_blocks[0].cross_attn.num_heads
    for i in range(len(teacher.regressor.regressor_blocks)):
        p = f"regressor.regressor_blocks.{i}"
        kv, pos_kv = torch.cat([unmasked, masked], 1), torch.cat([pos_u, pos_m], 1)
        w = [sd[f"{p}.cross_attn.{n}.weight"] for n in "qkv"]
        attn = _attention(_ln(masked + pos_m, sd, f"{p}.norm1_q"),
                          _ln(kv + pos_kv, sd, f"{p}.norm1_k"), _ln(kv, sd, f"{p}.norm1_v"),
                          w, sd[f"{p}.cross_attn.q_bias"], sd[f"{p}.cross_attn.v_bias"],
                          f"{p}.cross_attn.proj", sd, rheads)
        h = _ln(masked + sd[f"{p}.gamma_1_cross"] * attn, sd, f"{p}.norm2_cross")
        masked = h + sd[f"{p}.gamma_2_cross"] * _mlp(h, sd, f"{p}.mlp_cross")
    out = torch.zeros(batch, 196, dim)
    out[~mask] = unmasked.reshape(-1, dim)
    out[mask] = _ln(masked, sd, "regressor.norm").reshape(-1, dim)
    return out


def test_cae_matches_reference_encoder_and_regressor():
    teacher = create_teacher("cae_tiny_patch16", regressor_depth=2)
    images, mask_bn = _images(teacher), _random_mask(teacher, ratio=0.5)
    with torch.no_grad():
        expected = _reference_cae(teacher, images, mask_bn)
    assert torch.allclose(_run(teacher, images, mask_bn)[0], expected, atol=1e-5)


def test_cae_narrow_regressor_projects_all_tokens():
    teacher = create_teacher("cae_tiny_patch16", regressor_dim=32)
    assert teacher.embed_dim == 32
    assert teacher.regressor.regressor_blocks[0].cross_attn.num_heads == 1
    tokens_bnc, valid_bn = _run(teacher, _images(teacher), _random_mask(teacher))
    assert tokens_bnc.shape == (BATCH, 196, 32) and valid_bn.all()


# ---------------------------------------------------------------- official checkpoint layouts

def _training_args() -> argparse.Namespace:
    return argparse.Namespace(model="x_large_patch16", batch_size=64, lr=1.5e-3,
                              window_size=(14, 14), drop_path=0.1, output_dir="./output")


def _wrap(weights: dict) -> dict:
    """The container official `utils.save_model` writes."""
    return {"model": weights, "args": _training_args(), "epoch": 1599,
            "scaler": {"scale": 65536.0, "growth_tracker": 0}}


def _mae_official(teacher) -> dict:
    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    sd.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
               "decoder_pos_embed": torch.zeros(1, 197, 32), "decoder_norm.weight": torch.ones(32),
               "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
               "decoder_pred.weight": torch.randn(768, 32)})
    return sd


def _beit_official(teacher) -> dict:
    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    sd.update({"rel_pos_bias.relative_position_index": torch.zeros(197, 197, dtype=torch.long),
               "lm_head.weight": torch.randn(8192, 64), "lm_head.bias": torch.zeros(8192)})
    return sd


CAE_LAYOUTS = {  # regressor prefix, alignment-encoder prefix, decoder keys
    "lxtgh": ("pretext_neck.", "teacher.", ["pretext_neck.decoder_blocks.0.norm1.weight",
                                            "pretext_neck.norm2.weight",
                                            "pretext_neck.head.weight"]),
    "atten4vis": ("regresser.", "alignment_encoder.", ["decoder.decoder_blocks.0.norm1.weight",
                                                       "decoder.norm.weight", "decoder.head.weight",
                                                       "rd_pos_embed"]),
    "paddle_prefix": ("regressor_and_decoder.", "teacher_network.",
                      ["regressor_and_decoder.norm2.weight", "regressor_and_decoder.head.weight"]),
}


def _cae_official(teacher, layout: str = "atten4vis") -> dict:
    regressor, alignment, decoder = CAE_LAYOUTS[layout]
    sd = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("regressor."):
            key = regressor + key[len("regressor."):]
        elif key.startswith("encoder_to_regressor"):
            key = "encoder_to_decoder" + key[len("encoder_to_regressor"):]
        elif key.startswith("encoder."):
            sd[alignment + key[len("encoder."):]] = value.clone() + 1.0
        sd[key] = value.clone()
    sd.update({k: torch.randn(teacher.embed_dim) for k in decoder})
    return sd


OFFICIAL = {"mae": _mae_official, "beit": _beit_official, "cae": _cae_official}


def _assert_same_outputs(a: Teacher, b: Teacher):
    images, mask_bn = _images(a, seed=3), _random_mask(a, seed=3)
    for mask in (mask_bn, None):
        ta, va = _run(a, images, mask)
        tb, vb = _run(b, images, mask)
        assert torch.equal(ta, tb) and torch.equal(va, vb)


@pytest.mark.parametrize("name", TINY)
def test_official_pth_round_trip(name, tmp_path):
    torch.manual_seed(1)
    source = create_teacher(name)
    path = tmp_path / "official.pth"
    torch.save(_wrap(OFFICIAL[source.family](source)), path)
    torch.manual_seed(2)
    assert not torch.equal(_run(create_teacher(name), _images(source), None)[0],
                           _run(source, _images(source), None)[0])
    loaded = create_teacher(name, checkpoint=path)
    assert loaded.checkpoint_path == str(path) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    _assert_same_outputs(source, loaded)


@pytest.mark.parametrize("layout", sorted(CAE_LAYOUTS))
def test_cae_official_layouts_load(layout, tmp_path):
    torch.manual_seed(4)
    source = create_teacher("cae_tiny_patch16", regressor_dim=32)
    path = tmp_path / f"cae_{layout}.pth"
    torch.save(_wrap(_cae_official(source, layout)), path)
    loaded = create_teacher("cae_tiny_patch16", checkpoint=path, regressor_dim=32)
    _assert_same_outputs(source, loaded)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(5)
    source = create_teacher("cae_tiny_patch16")
    path = tmp_path / "cae.safetensors"
    save_file({k: v.contiguous() for k, v in _cae_official(source).items()}, str(path))
    _assert_same_outputs(source, create_teacher("cae_tiny_patch16", checkpoint=path))


def test_loader_unwraps_nested_containers_and_ddp_prefix(tmp_path):
    weights = {"module.w": torch.ones(2), "module.b": torch.zeros(1)}
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": {"model": weights}, "epoch": 3}, path)
    state = load_checkpoint_file(path)
    assert set(state) == {"w", "b"} and torch.equal(state["w"], torch.ones(2))


# ---------------------------------------------------------------- user errors

def _save_tiny(name: str, path: Path, **kwargs) -> Path:
    teacher = create_teacher(name, **kwargs)
    torch.save(_wrap(OFFICIAL[teacher.family](teacher)), path)
    return path


def test_checkpoint_of_another_family_is_rejected(tmp_path):
    path = _save_tiny("mae_vit_tiny_patch16", tmp_path / "mae.pth")
    with pytest.raises(HgkdError) as err:
        create_teacher("beit_tiny_patch16", checkpoint=path)
    message = str(err.value)
    assert str(path) in message and "'beit_tiny_patch16'" in message
    assert "missing keys" in message and "mask_token" in message
    assert "unexpected keys" in message and "\n" not in message


def test_checkpoint_of_another_size_reports_shapes(tmp_path):
    path = _save_tiny("mae_vit_tiny_patch16", tmp_path / "wide.pth", embed_dim=128)
    expected = r"shape mismatches.*cls_token \(1, 1, 128\) vs \(1, 1, 64\)"
    with pytest.raises(HgkdError, match=expected):
        create_teacher("mae_vit_tiny_patch16", checkpoint=path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(HgkdError, match="does not exist"):
        create_teacher("cae_tiny_patch16", checkpoint=tmp_path / "nope.pth")


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(HgkdError, match=r"refused to unpickle .*evil\.pth: it needs posix\.system"):
        create_teacher("mae_vit_tiny_patch16", checkpoint=path)
    assert not marker.exists()


@pytest.mark.parametrize("filename, content, match", [
    ("junk.pth", b"this is not a checkpoint", "could not be read as a PyTorch checkpoint"),
    ("junk.pt", b"garbage here", r"not a weights-only PyTorch checkpoint \(Unsupported"),
    ("empty.bin", b"", "could not be read as a PyTorch checkpoint"),
    ("junk.safetensors", b"\x00\x01 not safetensors", "not a valid safetensors file"),
    ("weights.ckpt", b"", "unsupported suffix"),
])
def test_files_that_are_not_checkpoints(tmp_path, filename, content, match):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(HgkdError, match=match):
        load_checkpoint_file(path)


def test_checkpoint_without_weights(tmp_path):
    path = tmp_path / "args_only.pth"
    torch.save({"args": _training_args(), "epoch": 1}, path)
    with pytest.raises(HgkdError, match="holds no weights"):
        load_checkpoint_file(path)


def test_sha256_file_is_streamed_digest(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * 1024 + 17)
    path.write_bytes(data)
    assert sha256_file(path, chunk_bytes=1024) == hashlib.sha256(data).hexdigest()
