"""Student encoders (H-GKD Sec. 3.2.1): real MinkowskiEngine vs SparK-style masked compute vs
active rows vs timm.

The ME backend is the reference for "sparse": the masked and rows backends must equal it
(values, active sites, gradients, BN running stats), all must equal a dense timm ResNet when
nothing is hidden, and hidden pixels must never reach any output. Tests that need
MinkowskiEngine skip when it is absent (GPU machines); there the CUDA tests compare the torch
backends with each other and with their CPU results.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from hgkd.distill.students import STUDENT_ENCODERS, create_encoder
from hgkd.distill.students.encoder import SparseResNetEncoder
from hgkd.distill.students.export import export_timm_state_dict, save_safetensors
from hgkd.errors import HgkdError

NAMES = STUDENT_ENCODERS.names()
HAS_ME = importlib.util.find_spec("MinkowskiEngine") is not None
needs_me = pytest.mark.skipif(not HAS_ME, reason="MinkowskiEngine is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TORCH_SPARSE = ["masked", "rows"]  # backends proven equal to MinkowskiEngine
SPARSE_BACKENDS = [pytest.param("minkowski", marks=needs_me), *TORCH_SPARSE]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
IMG = 64
# 16-px patches of a 64-px image. Sample 0: the top-left 32-px cell is fully visible, the
# top-right one partly (2 of 4 patches), bottom-left partly (1 of 4), bottom-right hidden.
# Sample 1: a checkerboard, so every 32-px cell is partly visible.
VISIBLE_16PX = torch.tensor([
    [[1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
    [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]],
], dtype=torch.bool)
VISIBLE_32PX = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 1]]], dtype=torch.bool)


def images(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize_batch_norms(encoder: SparseResNetEncoder, seed: int = 0) -> SparseResNetEncoder:
    """timm zero-inits the last BN of each block; random BN parameters and stats test every path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=gen))
            bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=gen))
    return encoder


def twins(name: str, dtype: torch.dtype, other: str = "masked",
          reference: str = "minkowski") -> tuple[SparseResNetEncoder, SparseResNetEncoder]:
    """The same weights under the reference backend (ME) and backend ``other``."""
    torch.manual_seed(0)
    ref = randomize_batch_norms(create_encoder(name, backend=reference)).to(dtype)
    twin = copy.deepcopy(ref)
    twin.backend = other
    return ref, twin


def expected_active(visible_bhw: torch.Tensor, stride: int) -> torch.Tensor:
    """A site at ``stride`` is active iff any visible pixel lies in its stride x stride cell."""
    pixels = visible_bhw.repeat_interleave(IMG // visible_bhw.shape[1], 1).repeat_interleave(IMG // visible_bhw.shape[2], 2)
    return F.max_pool2d(pixels[:, None].float(), stride)[:, 0] > 0


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """Max abs difference within ``rel`` of the expected tensor's largest magnitude."""
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-12)
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel} * {scale:.3g}"


def loss_of(stages: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A fixed random linear functional of all four stages, so every parameter gets a gradient."""
    gen = torch.Generator().manual_seed(1)
    return sum((feat * torch.randn(feat.shape, generator=gen, dtype=feat.dtype)).sum() for feat, _ in stages)


# ------------------------------------------------------------------ 1. ME == masked == rows
@needs_me
@pytest.mark.parametrize("visible", [VISIBLE_16PX, VISIBLE_32PX], ids=["16px", "32px"])
@pytest.mark.parametrize(("name", "backend"), [*((n, "masked") for n in NAMES), ("resnet18", "rows"), ("resnet50", "rows")])
def test_minkowski_equals_torch_backend_train_step_float64(name, visible, backend):
    """Values, active sites, every gradient and BN running stats agree to float64 round-off."""
    me, masked = twins(name, torch.float64, backend)
    assert_same_train_step(me, masked, visible)
    assert int(me.body.bn1.num_batches_tracked) == 1


def assert_same_train_step(me: SparseResNetEncoder, masked: SparseResNetEncoder, visible: torch.Tensor,
                           device: str = "cpu") -> None:
    """One float64 train step of each (``masked`` on ``device``) gives the same everything."""
    out = {}
    for enc, dev in ((me, "cpu"), (masked, device)):
        stages = enc.to(dev)(images(dtype=torch.float64).to(dev), visible)
        loss_of([(f.cpu(), a.cpu()) for f, a in stages]).backward()
        out[enc] = [(f.cpu(), a.cpu()) for f, a in stages]
    masked.cpu()
    for s, ((f_me, a_me), (f_mk, a_mk), stride) in enumerate(zip(out[me], out[masked], me.strides)):
        assert f_me.shape == f_mk.shape == (2, me.channels[s], IMG // stride, IMG // stride)
        assert torch.equal(a_me, a_mk) and torch.equal(a_me, expected_active(visible, stride))
        assert not f_me.masked_select(~a_me[:, None]).any() and not f_mk.masked_select(~a_mk[:, None]).any()
        assert_close_rel(f_me, f_mk, 1e-10, f"stage {s + 1}")
    params_masked = dict(masked.named_parameters())
    for pname, p in me.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, pname
        assert_close_rel(p.grad, params_masked[pname].grad, 1e-9, f"grad {pname}")
    buffers_masked = dict(masked.named_buffers())
    for bname, b in me.named_buffers():
        assert_close_rel(b.double(), buffers_masked[bname].double(), 1e-12, bname)


@needs_me
@pytest.mark.parametrize("backend", TORCH_SPARSE)
def test_minkowski_equals_torch_backend_float32_train_then_eval(backend):
    """The float32 path at the tolerance training runs at, including eval-mode (running stats)."""
    me, masked = twins("resnet18", torch.float32, backend)
    for mode in ("train", "eval"):
        results = []
        for enc in (me, masked):
            enc.train(mode == "train")
            enc.zero_grad()
            stages = enc(images(seed=2), VISIBLE_16PX)
            loss_of(stages).backward()
            results.append((stages, {n: p.grad for n, p in enc.named_parameters()}))
        (stages_me, grads_me), (stages_mk, grads_mk) = results
        for (f_me, a_me), (f_mk, a_mk) in zip(stages_me, stages_mk):
            assert torch.equal(a_me, a_mk)
            assert_close_rel(f_me, f_mk, 1e-4, mode)
        for pname, grad in grads_me.items():
            assert_close_rel(grad, grads_mk[pname], 1e-4, f"{mode} grad {pname}")
    for (bname, b), b_mk in zip(me.named_buffers(), masked.buffers()):
        assert_close_rel(b.double(), b_mk.double(), 1e-5, bname)


@pytest.mark.parametrize(("device", "backend"), [("cpu", "rows"), pytest.param("cuda", "masked", marks=needs_cuda),
                                                 pytest.param("cuda", "rows", marks=needs_cuda)])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torch_backends_on_device_equal_masked_on_cpu(name, device, backend):
    """Without MinkowskiEngine (GPU machines): each torch backend on ``device`` equals the masked
    backend on the CPU, float64, train step (values, sites, gradients, BN running stats)."""
    reference, twin = twins(name, torch.float64, backend, reference="masked")
    assert_same_train_step(reference, twin, VISIBLE_16PX, device)


def minkowski_has_cuda() -> bool:
    """A CUDA device and a MinkowskiEngine built with CUDA (only then is ME imported here)."""
    if not (HAS_ME and torch.cuda.is_available()):
        return False
    import MinkowskiEngine as ME
    return bool(ME.is_cuda_available())


@pytest.mark.skipif(not minkowski_has_cuda(), reason="needs a CUDA device and MinkowskiEngine built with CUDA")
@pytest.mark.parametrize("visible", [VISIBLE_16PX, VISIBLE_32PX], ids=["16px", "32px"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_minkowski_on_cuda_equals_masked_on_cpu(name, visible):
    """MinkowskiEngine's CUDA kernels (GPU coordinate maps) give the masked backend's CPU train
    step: values, active sites, gradients, BN running stats, float64."""
    reference, twin = twins(name, torch.float64, "minkowski", reference="masked")
    assert_same_train_step(reference, twin, visible, "cuda")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_me), pytest.param(
    "cuda", marks=pytest.mark.skipif(not minkowski_has_cuda(), reason="needs MinkowskiEngine built with CUDA"))])
def test_minkowski_under_bf16_autocast_runs_in_float32_and_tracks_it(device):
    """Under bf16 autocast the 1x1 convs return bfloat16; MinkowskiEngine's kernels take float32
    only (bf16 crashed them on the GPU), so its layers get float32 features and the train step
    runs, keeps the mask pattern and stays close to the float32 step."""
    torch.manual_seed(0)
    enc32 = randomize_batch_norms(create_encoder("resnet18", backend="minkowski")).to(device)
    enc16 = copy.deepcopy(enc32)
    x = images(seed=7).to(device)
    stages32 = enc32(x, VISIBLE_16PX)
    with torch.autocast(device, dtype=torch.bfloat16):
        stages16 = enc16(x, VISIBLE_16PX)
    loss_of([(f.float().cpu(), a.cpu()) for f, a in stages16]).backward()
    for s, ((f16, a16), (f32, a32)) in enumerate(zip(stages16, stages32)):
        assert torch.equal(a16, a32) and not f16.masked_select(~a16[:, None]).any()
        assert_close_rel(f16.float(), f32.detach(), 0.1, f"bf16 stage {s + 1}")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc16.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", TORCH_SPARSE)
def test_bf16_autocast_train_step_tracks_float32(backend, device):
    """Under bf16 autocast (the GPU recipe) a train step runs, keeps the mask pattern and float32
    BN buffers, and stays close to the float32 step on the same weights."""
    torch.manual_seed(0)
    enc32 = randomize_batch_norms(create_encoder("resnet18", backend=backend)).to(device)
    enc16 = copy.deepcopy(enc32)
    x = images(seed=7).to(device)
    stages32 = enc32(x, VISIBLE_16PX)
    with torch.autocast(device, dtype=torch.bfloat16):
        stages16 = enc16(x, VISIBLE_16PX)
    loss_of([(f.float().cpu(), a) for f, a in stages16]).backward()
    for s, ((f16, a16), (f32, a32)) in enumerate(zip(stages16, stages32)):
        assert f16.dtype == torch.bfloat16 and torch.equal(a16, a32)
        assert not f16.masked_select(~a16[:, None]).any()
        assert_close_rel(f16.float(), f32.detach(), 0.1, f"bf16 stage {s + 1}")
    for (bname, b16), b32 in zip(enc16.named_buffers(), enc32.buffers()):
        assert b16.dtype == b32.dtype and torch.isfinite(b16.float()).all(), bname
        assert_close_rel(b16.double(), b32.double(), 0.05, bname)
    assert all(torch.isfinite(p.grad).all() for p in enc16.parameters())


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("HGKD_TEST_COMPILE") != "1",
                                                 reason="torch.compile takes ~60 s on 2 CPU cores; HGKD_TEST_COMPILE=1 runs it")),
    pytest.param("cuda", marks=needs_cuda)])
def test_compiled_masked_batch_norm_equals_eager(device):
    """``compile_bn=True`` (torch.compile of the fused BatchNorm) changes no value, float64."""
    reference, twin = twins("resnet18", torch.float64, "masked", reference="masked")
    twin.compile_bn = True
    assert_same_train_step(reference, twin, VISIBLE_16PX, device)


@pytest.mark.parametrize("backend", TORCH_SPARSE)
def test_channels_last_weights_give_the_same_train_step(backend):
    """``encoder.to(memory_format=torch.channels_last)`` (fast convs) changes no value."""
    reference, twin = twins("resnet50", torch.float64, backend, reference="masked")
    assert_same_train_step(reference, twin.to(memory_format=torch.channels_last), VISIBLE_32PX)


# ------------------------------------------------------------------ 2. all visible == timm
@pytest.mark.parametrize(("mode", "dtype", "rel"), [("eval", torch.float32, 1e-4), ("train", torch.float64, 1e-9)],
                         ids=["eval-float32", "train-float64"])  # BN over 8 sites at stride 32 is ill-conditioned in float32
@pytest.mark.parametrize("backend", [*SPARSE_BACKENDS, "dense"])
@pytest.mark.parametrize("name", NAMES)
def test_all_visible_equals_dense_timm(name, backend, mode, dtype, rel):
    """Nothing hidden: every backend is the dense timm ResNet (train mode: also its BN running stats)."""
    encoder = randomize_batch_norms(create_encoder(name, backend=backend)).train(mode == "train")
    timm_model = timm.create_model(name, num_classes=0).train(mode == "train")
    timm_model.load_state_dict(export_timm_state_dict(encoder), strict=True)
    encoder, timm_model = encoder.to(dtype), timm_model.to(dtype)
    x = images(seed=3, dtype=dtype)
    with torch.no_grad():
        stages = encoder(x, torch.ones(2, 4, 4, dtype=torch.bool))
        reference = timm_model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    for s, ((feat, active), ref) in enumerate(zip(stages, reference)):
        assert active.all() and feat.shape == ref.shape
        assert_close_rel(feat, ref, rel, f"stage {s + 1}")
    for (bname, b), ref in zip(encoder.body.named_buffers(), timm_model.buffers()):
        assert_close_rel(b.double(), ref.double(), rel, bname)


# ------------------------------------------------------------------ 3. no leakage
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_hidden_pixels_never_reach_any_output(backend):
    """Changing hidden pixels changes nothing, bit for bit, in train mode (BN over the batch)."""
    encoder = randomize_batch_norms(create_encoder("resnet18", backend=backend))
    visible_pix = expected_active(VISIBLE_16PX, 1)[:, None]
    x = images(seed=4)
    x_other = torch.where(visible_pix, x, 100 * images(seed=5))
    with torch.no_grad():
        for (f, a), (f_other, a_other) in zip(encoder(x, VISIBLE_16PX), encoder(x_other, VISIBLE_16PX)):
            assert torch.equal(f, f_other) and torch.equal(a, a_other)


def test_dense_backend_loses_the_mask_pattern():
    """The ``sparse=off`` ablation: hidden pixels are zero-filled (so their content is ignored
    too), but features grow into hidden regions and differ from the sparse ones at visible sites."""
    dense = randomize_batch_norms(create_encoder("resnet18", backend="dense")).eval()
    masked = copy.deepcopy(dense)
    masked.backend = "masked"
    visible_pix = expected_active(VISIBLE_16PX, 1)[:, None]
    x = images(seed=4)
    x_other = torch.where(visible_pix, x, 100 * images(seed=5))
    with torch.no_grad():
        stages, stages_other, sparse = dense(x, VISIBLE_16PX), dense(x_other, VISIBLE_16PX), masked(x, VISIBLE_16PX)
    for (f, a), (f_other, _), (f_sparse, a_sparse) in zip(stages, stages_other, sparse):
        assert a.all() and torch.equal(f, f_other)
        assert f.masked_select(~a_sparse[:, None]).abs().max() > 0  # hidden sites carry features
    f_dense, f_sparse = stages[0][0], sparse[0][0]
    assert (f_dense - f_sparse).masked_select(sparse[0][1][:, None]).abs().max() > 1e-3


# ------------------------------------------------------------------ 4. export
@pytest.mark.parametrize("name", NAMES)
def test_export_loads_strict_into_timm_and_round_trips_safetensors(name, tmp_path):
    encoder = randomize_batch_norms(create_encoder(name, backend="masked")).eval()
    state = export_timm_state_dict(encoder)
    dense = timm.create_model(name, num_classes=0).eval()
    dense.load_state_dict(state, strict=True)
    x = images(seed=6)
    with torch.no_grad():
        for (feat, _), ref in zip(encoder(x, torch.ones(2, 2, 2, dtype=torch.bool)),
                                  dense.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)):
            assert_close_rel(feat, ref, 1e-4, name)
    path = tmp_path / "student.safetensors"
    save_safetensors(encoder, path)
    loaded = load_file(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["architecture"] == name
    timm.create_model(name, num_classes=0).load_state_dict(loaded, strict=True)


# ------------------------------------------------------------------ 5. registry and errors
@pytest.mark.parametrize("name", NAMES)
def test_registered_encoders_describe_their_stages(name):
    encoder = create_encoder(name, backend="masked")
    expansion = 4 if name == "resnet50" else 1
    assert encoder.channels == [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    assert encoder.strides == [4, 8, 16, 32]
    assert set(encoder.state_dict()) == {f"body.{k}" for k in timm.create_model(name, num_classes=0).state_dict()}


def test_user_errors_are_hgkd_errors():
    with pytest.raises(HgkdError, match="sparse backend 'bogus'"):
        create_encoder("resnet18", backend="bogus")
    with pytest.raises(HgkdError, match="unknown student encoder"):
        create_encoder("vit_base", backend="masked")
    with pytest.raises(HgkdError, match="drop-path"):
        create_encoder("resnet18", backend="masked", drop_path_rate=0.1)
    create_encoder("resnet18", backend="dense", drop_path_rate=0.1)  # the dense ablation runs any timm ResNet


def test_masked_backend_bn_with_a_single_active_site_keeps_finite_stats():
    """Batch of one, one visible 32-px cell: stride-32 BN sees one site; running stats stay finite."""
    torch.manual_seed(0)
    enc = create_encoder("resnet18", backend="masked").train()
    visible = torch.zeros(1, 2, 2, dtype=torch.bool)
    visible[0, 0, 0] = True
    enc.forward_features(torch.randn(1, 3, 64, 64), visible)
    for name, buf in enc.body.named_buffers():
        if name.endswith("running_var"):
            assert torch.isfinite(buf).all(), name
