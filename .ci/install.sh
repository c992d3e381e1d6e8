#!/usr/bin/env bash
# Create .venv/ with every dependency of hgkd, including MinkowskiEngine 0.5.4 built CPU-only.
# Idempotent: a second run only checks. The ME wheel is cached per torch version in
# ${HGKD_WHEEL_CACHE:-~/.cache/hgkd/wheels} so later set-ups skip the 7-8 minute build.
# Build recipe and the reasons for each flag: ../shared/notes/minkowskiengine.md (project notes).
set -euo pipefail
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
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

log() { echo "[install] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"   # ME's setup.py calls the first `pip` on PATH
VPY=$VENV/bin/python

if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
  log "installing libopenblas-dev (apt)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas-dev >/dev/null
fi

"$VPY" -m pip install -q "pip>=24" "setuptools>=70,<81" wheel
log "installing torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION and the project"
quiet "$VPY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "numpy>=2,<2.5"
quiet "$VPY" -m pip install -q -e ".[dev]"

if "$VPY" -c "import MinkowskiEngine" 2>/dev/null; then
  log "MinkowskiEngine already importable"
  exit 0
fi

tv=$("$VPY" -c "import torch; print(torch.__version__.replace('+', '_'))")
cache_dir=$WHEEL_CACHE/torch-$tv
find_wheel() { find "$cache_dir" -maxdepth 1 -iname "minkowskiengine-$ME_VERSION-*.whl" 2>/dev/null | head -n1; }
wheel=$(find_wheel)
if [ -z "$wheel" ]; then
  log "building MinkowskiEngine $ME_VERSION CPU-only (7-8 minutes on 2 cores)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  SETUPTOOLS_USE_DISTUTILS=stdlib "$VPY" -m pip download -q --no-deps --no-binary :all: \
    --no-build-isolation -d "$work" "MinkowskiEngine==$ME_VERSION"
  echo "$ME_SHA256  $work/MinkowskiEngine-$ME_VERSION.tar.gz" | sha256sum -c - >/dev/null
  tar -xzf "$work/MinkowskiEngine-$ME_VERSION.tar.gz" -C "$work"
  src=$work/MinkowskiEngine-$ME_VERSION
  # Python >= 3.10 moved Sequence to collections.abc (fixed upstream after 0.5.4, PR #480).
  sed -i 's/^from collections import Sequence$/from collections.abc import Sequence/' \
    "$src"/MinkowskiEngine/MinkowskiCommon.py "$src"/MinkowskiEngine/MinkowskiCoordinateManager.py \
    "$src"/MinkowskiEngine/MinkowskiTensorField.py "$src"/MinkowskiEngine/utils/quantization.py
  sed -i 's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
    "$src"/MinkowskiEngine/MinkowskiKernelGenerator.py
  if grep -rn "^from collections import .*Sequence" "$src/MinkowskiEngine" >/dev/null; then
    log "error: unpatched 'from collections import Sequence' left in MinkowskiEngine sources"; exit 1
  fi
  mkdir -p "$cache_dir"
  (cd "$work" && MAX_JOBS=2 SETUPTOOLS_USE_DISTUTILS=stdlib "$VPY" -m pip wheel -q --no-deps \
    --no-build-isolation --use-pep517 \
    --config-settings=--global-option=--cpu_only \
    --config-settings=--global-option=--blas=openblas \
    -w "$cache_dir" "$src")
  wheel=$(find_wheel)
  [ -n "$wheel" ] || { log "error: the MinkowskiEngine build produced no wheel in $cache_dir"; exit 1; }
fi
log "installing $wheel"
"$VPY" -m pip install -q --no-deps "$wheel"
"$VPY" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__)"
