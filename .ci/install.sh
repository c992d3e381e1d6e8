#!/usr/bin/env bash
# Create .venv/ with every dependency of hgkd, including MinkowskiEngine 0.5.4, built CPU-only, or
# with CUDA where nvcc and a GPU are present (HGKD_ME_BUILD=cpu|cuda overrides the choice).
# Idempotent: a second run only checks. The ME wheel is cached per torch version and build in
# ${HGKD_WHEEL_CACHE:-${XDG_CACHE_HOME:-~/.cache}/hgkd/wheels} so later set-ups skip the build.
# Every failure prints one line naming the step that failed.
# Build recipe and the reasons for each flag: ../shared/notes/minkowskiengine.md (project notes).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
ME_VERSION=0.5.4
ME_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
WHEEL_CACHE=${HGKD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hgkd/wheels}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip here may list missing local find-links folders once per package: keep logs readable
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true); }

log() { echo "[install] $*" >&2; }
# Every failure names the step it happened in: no silent exit under `set -e`.
STEP="start"
step() { STEP="$*"; log "$*"; }
trap 'rc=$?; echo "[install] error: step \"$STEP\" failed (exit $rc, line $LINENO: $BASH_COMMAND)" >&2; exit $rc' ERR

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"   # ME's setup.py calls the first `pip` on PATH
VPY=$VENV/bin/python

if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
  step "installing libopenblas-dev (apt)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libopenblas-dev >/dev/null
fi

step "upgrading pip, setuptools, wheel"
"$VPY" -m pip install -q "pip>=24" "setuptools>=70,<81" wheel
step "installing torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION and the project"
quiet "$VPY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "numpy>=2,<2.5"
quiet "$VPY" -m pip install -q -e ".[dev]"

if "$VPY" -c "import MinkowskiEngine" 2>/dev/null; then
  log "MinkowskiEngine already importable"
  exit 0
fi

# Source patches for ME 0.5.4 (Python >= 3.10; CUDA 12/13, CCCL 3, torch 2.11): one home, also used by
# benchmarks/device_me_build.sh, which built and ran them on an H200 with CUDA 13.0 (issue 20).
# shellcheck source=me_patches.sh
source "$ROOT/.ci/me_patches.sh"

tv=$("$VPY" -c "import torch; print(torch.__version__.replace('+', '_'))")
if [ -n "${HGKD_ME_BUILD:-}" ]; then
  build=$HGKD_ME_BUILD
elif command -v nvcc >/dev/null 2>&1 && "$VPY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  build=cuda
else
  build=cpu
fi
case "$build" in cpu|cuda) ;; *) log "error: HGKD_ME_BUILD=$build: choose cpu or cuda"; exit 2 ;; esac
log "MinkowskiEngine build: $build (torch $tv)"
cache_dir=$WHEEL_CACHE/torch-$tv-$build
find_wheel() {  # prints nothing (and succeeds) when the cache folder does not exist yet
  [ -d "$cache_dir" ] || return 0
  find "$cache_dir" -maxdepth 1 -iname "minkowskiengine-$ME_VERSION-*.whl" | head -n1
}
wheel=$(find_wheel)
if [ -z "$wheel" ]; then
  step "building MinkowskiEngine $ME_VERSION ($build; CPU-only takes 7-8 minutes on 2 cores)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # pip runs the sdist's unpatched setup.py for its metadata, which probes BLAS through numpy.distutils
  # (Python < 3.12 only); where that fails, the sdist comes from the index's simple page instead
  SETUPTOOLS_USE_DISTUTILS=stdlib "$VPY" -m pip download -q --no-deps --no-binary :all: \
    --no-build-isolation -d "$work" "MinkowskiEngine==$ME_VERSION" 2>/dev/null \
    || "$VPY" "$ROOT/.ci/fetch_sdist.py" MinkowskiEngine "$ME_VERSION" "$ME_SHA256" "$work"
  echo "$ME_SHA256  $work/MinkowskiEngine-$ME_VERSION.tar.gz" | sha256sum -c - >/dev/null
  tar -xzf "$work/MinkowskiEngine-$ME_VERSION.tar.gz" -C "$work"
  src=$work/MinkowskiEngine-$ME_VERSION
  me_patch_python "$src"
  mkdir -p "$cache_dir"
  if [ "$build" = cpu ]; then
    flags=(--config-settings=--global-option=--cpu_only)
    jobs=2
  else
    me_patch_cuda "$src"
    flags=(--config-settings=--global-option=--force_cuda)
    jobs=$(nproc)
    # build for this machine's GPU only (a full arch list multiplies the build time)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$VPY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  fi
  (cd "$work" && MAX_JOBS=$jobs SETUPTOOLS_USE_DISTUTILS=stdlib "$VPY" -m pip wheel -q --no-deps \
    --no-build-isolation --use-pep517 "${flags[@]}" \
    --config-settings=--global-option=--blas=openblas \
    -w "$cache_dir" "$src")
  wheel=$(find_wheel)
  [ -n "$wheel" ] || { log "error: the MinkowskiEngine build produced no wheel in $cache_dir"; exit 1; }
fi
step "installing $wheel"
"$VPY" -m pip install -q --no-deps "$wheel"
"$VPY" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__)"
