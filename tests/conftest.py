"""Shared fixtures: real webdataset tars of real photos, tiny real teachers, real caches."""
from __future__ import annotations

import os

# Tiny tensors on 2 cores: one intra-op thread per process avoids oversubscription when
# tests run several processes (parallel extraction, DDP) at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit
import shutil
import tempfile

# Stage two's persistent sample index (issue 15) goes to a folder of this test session, not
# to the user's ~/.cache: tests stay hermetic and leave nothing behind.
_SAMPLE_INDEX = tempfile.mkdtemp(prefix="hgkd-test-sample-index-")
os.environ["HGKD_SAMPLE_INDEX"] = _SAMPLE_INDEX
atexit.register(shutil.rmtree, _SAMPLE_INDEX, True)

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from hgkd.extract.cli import main as extract_cli
from hgkd.data.demo_data import SKIMAGE_IMAGES, _jpeg, _load

TINY_TEACHER = "mae_vit_tiny_patch16"
IMG = 64  # 4x4 patch grid keeps the suite fast


def write_tars(out: Path, names: list[str], per_shard: int, extra: dict | None = None) -> str:
    """Real photos into ``part-NNN.tar`` shards; ``extra`` maps key -> raw member dict."""
    out.mkdir(parents=True, exist_ok=True)
    samples = [{"__key__": f"img/{n}", "jpg": _jpeg(_load(n)), "cls": str(i)} for i, n in enumerate(names)]
    for key, members in (extra or {}).items():
        samples.insert(len(samples) // 2, {"__key__": key, **members})
    n_shards = -(-len(samples) // per_shard)
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"part-{s:03d}.tar")) as sink:
            for sample in samples[s * per_shard : (s + 1) * per_shard]:
                sink.write(sample)
    return str(out / f"part-{{000..{n_shards - 1:03d}}}.tar")


@pytest.fixture(scope="session")
def photo_tars(tmp_path_factory) -> str:
    """12 real photos in 3 tar shards."""
    return write_tars(tmp_path_factory.mktemp("tars"), list(SKIMAGE_IMAGES[:12]), per_shard=4)


def extract_args(data: str, out: str, *extra: str) -> list[str]:
    return ["run", "--data", data, "--teacher", TINY_TEACHER, "--out", out, "--img-size", str(IMG),
            "--views-per-image", "2", "--shard-views", "8", "--batch-size", "4", "--mask-ratio", "0.5",
            "--no-progress", *extra]


def run_cli(args: list[str]):
    result = CliRunner().invoke(extract_cli, args, catch_exceptions=False)
    return result


def run_cli_subprocess(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hgkd.extract.cli", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def f32_cache(photo_tars, tmp_path_factory) -> str:
    """A complete cache with exact (float32) tokens."""
    out = str(tmp_path_factory.mktemp("cache") / "f32.zarr")
    result = run_cli(extract_args(photo_tars, out, "--codec", "f32"))
    assert result.exit_code == 0, result.output
    return out


def corrupt_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[:60]  # truncated: header only


def kill_extract_when(args: list[str], marker: Path, timeout_s: float = 120) -> None:
    """Run ``hgkd-extract`` with ``args`` in a child process and kill -9 it as soon as
    ``marker`` (e.g. a shard's completion record) exists: a crash in the middle of a run."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "hgkd.extract.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and not marker.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
