"""The decoder is part of the view (issue 20): caches record it and keep a pixel fingerprint,
stage two renders with the same decoder and checks the pixels, and the device decoder's batched
path (nvJPEG on CUDA) gives, run on the CPU, exactly the CPU decoder's views."""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from hgkd.data.decoders import PendingViews, check_decoder, decode_on_device, image_hw
from hgkd.data.sources import open_source
from hgkd.data.view_config import ViewConfig
from hgkd.data.views import decode_image, render_view, sample_view
from hgkd.distill.data import CacheViewDataset
from hgkd.errors import HgkdError
from hgkd.extract.run import prepare_sample, render_on_device
from hgkd.storage.cache import FeatureCache
from hgkd.storage.metadata import SKIP_UNDECODABLE
from hgkd.storage.fingerprint import MAX_VIEWS, read_fingerprint, write_fingerprint

from conftest import IMG, extract_args, run_cli
from test_distill import distill_args, invoke

CPU = torch.device("cpu")


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_view_config_json_keeps_old_caches_identical():
    """'pil' is what every earlier cache used: its JSON (and so cache fingerprints) has no decoder key."""
    assert "decoder" not in ViewConfig().to_json()
    assert ViewConfig.from_json(ViewConfig().to_json()).decoder == "pil"
    assert ViewConfig.from_json(ViewConfig(decoder="nvjpeg").to_json()).decoder == "nvjpeg"
    with pytest.raises(HgkdError, match="--decoder 'jpeg9'"):
        ViewConfig(decoder="jpeg9")


def test_nvjpeg_needs_a_cuda_device():
    check_decoder("pil", CPU)
    with pytest.raises(HgkdError, match="--decoder nvjpeg decodes on a CUDA device"):
        check_decoder("nvjpeg", CPU)


def test_device_path_on_the_cpu_equals_the_cpu_decoder(photo_tars):
    """Batched decode_jpeg + crop/resize/flip of PendingViews (nvJPEG's path) on the CPU uses
    libjpeg-turbo, so it must give the CPU decoder's views exactly; PNGs take the fallback."""
    samples = [s for s in open_source([photo_tars])][:5]
    blobs = [s.data for s in samples] + [png_bytes()]
    cfg = ViewConfig(img_size=IMG, views_per_image=3)
    images = [decode_image(b) for b in blobs]
    params = [sample_view(cfg, f"k{i}", k, tuple(img.shape[1:])) for i, img in enumerate(images) for k in range(3)]
    pending = PendingViews(blobs, [n // 3 for n in range(len(params))],
                           torch.tensor([p.crop_tlhw for p in params], dtype=torch.int32),
                           torch.tensor([p.flip for p in params]), cfg.img_size, cfg.interpolation)
    want = torch.stack([render_view(images[n // 3], p, cfg) for n, p in enumerate(params)])
    assert torch.equal(pending.render(CPU), want)
    assert [image_hw(b) for b in blobs] == [tuple(img.shape[1:]) for img in images]


def test_device_decode_isolates_an_undecodable_image(photo_tars):
    good = next(iter(open_source([photo_tars]))).data
    out = decode_on_device([good, good[: len(good) // 2], good], CPU)
    assert isinstance(out[1], Exception) and torch.equal(out[0], decode_image(good)) and torch.equal(out[0], out[2])
    with pytest.raises(HgkdError, match="cannot be decoded"):
        PendingViews([good[: len(good) // 2]], [0], torch.tensor([[0, 0, 8, 8]]), torch.tensor([False]), 16,
                     "bicubic").render(CPU)


def test_extraction_with_a_device_decoder_renders_and_skips_like_the_cpu(photo_tars):
    """prepare_sample reads only the header for a device decoder; render_on_device fills the
    views (equal to the CPU decoder's on the CPU) and skips a JPEG whose body is corrupt."""
    samples = [s for s in open_source([photo_tars])][:3]
    cpu_cfg = ViewConfig(img_size=IMG, views_per_image=2)
    dev_cfg = ViewConfig(img_size=IMG, views_per_image=2, decoder="nvjpeg")
    samples[1] = replace(samples[1], data=samples[1].data[: len(samples[1].data) // 2])  # header intact, cut short
    pending = [prepare_sample(s, dev_cfg) for s in samples]
    assert all(p.views_kchw is None for p in pending) and pending[1].error is None  # the header reads fine
    render_on_device(pending, dev_cfg, CPU)
    reference = [prepare_sample(s, cpu_cfg) for s in samples]
    for i in (0, 2):
        assert torch.equal(pending[i].views_kchw, reference[i].views_kchw)
    assert pending[1].reason == reference[1].reason == SKIP_UNDECODABLE and pending[1].views_kchw is None


def test_cache_keeps_the_teachers_first_views_and_stage_two_checks_them(f32_cache, photo_tars):
    found = read_fingerprint(FeatureCache.open(f32_cache))
    assert found is not None
    rows, views = found
    assert rows.tolist() == list(range(MAX_VIEWS)) and views.shape == (MAX_VIEWS, 3, IMG, IMG)
    batch = CacheViewDataset(f32_cache, [photo_tars])[rows.tolist()].ready()
    assert torch.equal(batch.images, torch.from_numpy(views))  # stage two's own path, pixel for pixel


def test_pixel_mismatch_stops_the_run_with_its_size_unless_allowed(f32_cache, photo_tars, tmp_path, caplog):
    copy = tmp_path / "cache.zarr"
    shutil.copytree(f32_cache, copy)
    cache = FeatureCache.open(str(copy), mode="r+")
    rows, views = read_fingerprint(cache)
    views = views.astype(np.int16)
    views[0, 0, 0, 0] += 3 if views[0, 0, 0, 0] < 250 else -3  # what another decoder would do to one pixel
    write_fingerprint(cache, rows, views.astype(np.uint8))
    result = invoke(distill_args(str(copy), photo_tars, str(tmp_path / "run"), "--epochs", "1", "--warmup-epochs", "0"))
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert "decoded by 'pil'" in line and "max 3 levels" in line and "--allow-decoder-mismatch" in line
    allowed = invoke(distill_args(str(copy), photo_tars, str(tmp_path / "run2"), "--epochs", "1", "--warmup-epochs",
                                  "0", "--allow-decoder-mismatch"))
    assert allowed.exit_code == 0, allowed.output
    assert "max 3 levels" in allowed.stderr


def test_a_cache_without_fingerprint_trains_and_says_it_was_not_checked(f32_cache, photo_tars, tmp_path):
    copy = tmp_path / "old.zarr"
    shutil.copytree(f32_cache, copy)
    shutil.rmtree(copy / "fingerprint")
    result = invoke(distill_args(str(copy), photo_tars, str(tmp_path / "run"), "--epochs", "1", "--warmup-epochs", "0"))
    assert result.exit_code == 0, result.output
    assert "no pixel fingerprint" in result.stderr


def test_extract_refuses_nvjpeg_without_cuda_before_writing(photo_tars, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nvjpeg is allowed")
    out = tmp_path / "c.zarr"
    result = run_cli(extract_args(photo_tars, str(out), "--decoder", "nvjpeg"))
    assert result.exit_code != 0 and "--decoder nvjpeg decodes on a CUDA device" in result.output
    assert not FeatureCache.exists(str(out))


def test_info_names_the_decoder_and_the_fingerprint(f32_cache):
    """The view settings name the decoder only when it is not pil (old caches: pil); info says both."""
    meta = json.loads(run_cli(["info", "--json", f32_cache]).output)
    assert "decoder" not in meta["view"]
    assert "pixels     decoder=pil; fingerprint of rows 0, 1, 2, 3" in run_cli(["info", f32_cache]).output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_nvjpeg_cache_on_cuda_trains_on_its_own_pixels_and_refuses_pil(photo_tars, tmp_path):
    """On a GPU (benchmarks/device_check.sh runs this): a cache extracted with nvJPEG records it,
    stage two re-renders its fingerprint exactly with nvJPEG, and refuses the CPU decoder's pixels."""
    cache = str(tmp_path / "nv.zarr")
    result = run_cli(extract_args(photo_tars, cache, "--decoder", "nvjpeg", "--device", "cuda"))
    assert result.exit_code == 0, result.output
    assert "decoder=nvjpeg" in run_cli(["info", cache]).output
    ok = invoke(distill_args(cache, photo_tars, str(tmp_path / "run"), "--epochs", "1", "--warmup-epochs", "0"))
    assert ok.exit_code == 0, ok.output
    assert "pixels checked: decoder 'nvjpeg' on cuda" in ok.stderr
    refused = invoke(distill_args(cache, photo_tars, str(tmp_path / "pil"), "--epochs", "1", "--decoder", "pil"))
    assert refused.exit_code != 0 and "decoded by 'nvjpeg'" in refused.output and "max " in refused.output
