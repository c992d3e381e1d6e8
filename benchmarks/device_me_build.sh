#!/usr/bin/env bash
# Time-boxed CUDA build of MinkowskiEngine 0.5.4 on a GPU machine without a package registry
# (issue 20, item 5). Called by device_check.sh (in the foreground: no measured part shares the
# CPU with the compiler); writes OUT_DIR/me_build.json (and the wheel in OUT_DIR/wheel/): {"ok", "seconds", "reason", "wheel"} where
# reason is the build's first error line when it fails.
#
# Usage: benchmarks/device_me_build.sh CARRY_DIR OUT_DIR SITE_DIR
#   CARRY_DIR holds MinkowskiEngine-0.5.4.tar.gz and the OpenBLAS .debs (libopenblas0-pthread,
#   libopenblas-pthread-dev, libgfortran5, libquadmath0): the machine has no apt and no BLAS headers.
#   The built wheel is installed into SITE_DIR (put it on PYTHONPATH; add SITE_DIR/blas-lib to
#   LD_LIBRARY_PATH for OpenBLAS at run time).
# Environment: PYTHON (python3), ME_BUILD_JOBS (nproc), TORCH_CUDA_ARCH_LIST (this GPU's).
set -uo pipefail
CARRY=$(cd "$1" && pwd); OUT_DIR=$2; SITE=$3
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # absolute: the build runs in the sdist
ME_VERSION=0.5.4
ME_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
START=$(date +%s)
WORK=$(mktemp -d /tmp/me_build.XXXXXX)
LOG=$OUT_DIR/me_build.log

finish() {  # finish OK REASON [WHEEL]
  "$PY" - "$OUT_DIR/me_build.json" "$1" "$2" "${3:-}" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
path, ok, reason, wheel, secs = sys.argv[1:]
json.dump({"ok": ok == "1", "reason": reason, "wheel": wheel or None, "seconds": int(secs)}, open(path, "w"), indent=2)
EOF
  echo "[me_build] ok=$1 after $(( $(date +%s) - START ))s: $2"
  exit 0
}
first_error() {  # the first compiler/linker error of the log, one line
  grep -m1 -E "error:|Error:|error [0-9]|undefined reference|No such file" "$LOG" | cut -c1-300 || echo "no error line in the log"
}

echo "$ME_SHA256  $CARRY/MinkowskiEngine-$ME_VERSION.tar.gz" | sha256sum -c - >/dev/null \
  || finish 0 "MinkowskiEngine-$ME_VERSION.tar.gz missing or not the released sdist in $CARRY"
BLAS=$SITE/blas
mkdir -p "$BLAS" "$SITE/blas-lib"
for deb in "$CARRY"/*.deb; do dpkg -x "$deb" "$BLAS" || finish 0 "could not unpack $deb"; done
BLAS_INC=$BLAS/usr/include/x86_64-linux-gnu/openblas-pthread
BLAS_LIB=$BLAS/usr/lib/x86_64-linux-gnu/openblas-pthread
[ -f "$BLAS_INC/cblas.h" ] || finish 0 "no cblas.h in the carried OpenBLAS .debs"
cp -a "$BLAS_LIB"/libopenblas* "$BLAS"/usr/lib/x86_64-linux-gnu/lib{gfortran,quadmath}.so* "$SITE/blas-lib/" 2>/dev/null
export LD_LIBRARY_PATH="$SITE/blas-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

tar -xzf "$CARRY/MinkowskiEngine-$ME_VERSION.tar.gz" -C "$WORK"
SRC=$WORK/MinkowskiEngine-$ME_VERSION
# shellcheck source=../.ci/me_patches.sh
source "$REPO/.ci/me_patches.sh"
me_patch_python "$SRC" >>"$LOG" 2>&1 || finish 0 "Python source patch failed: $(tail -n1 "$LOG")"
me_patch_cuda "$SRC" >>"$LOG" 2>&1 || finish 0 "CUDA source patch failed: $(tail -n1 "$LOG")"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${ME_BUILD_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  else finish 0 "no nvcc: neither CUDA_HOME nor /usr/local/cuda nor PATH has the CUDA compiler"; fi
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"  # no SETUPTOOLS_USE_DISTUTILS: Python 3.12 has no stdlib distutils
echo "[me_build] nvcc $(nvcc --version | tail -n1); arch $TORCH_CUDA_ARCH_LIST; jobs $MAX_JOBS; CUDA_HOME $CUDA_HOME" | tee -a "$LOG"
(cd "$SRC" && "$PY" setup.py bdist_wheel -d "$WORK/dist" --force_cuda --blas=openblas \
   --blas_include_dirs="$BLAS_INC" --blas_library_dirs="$BLAS_LIB") >>"$LOG" 2>&1 \
  || finish 0 "build failed: $(first_error)"
WHEEL=$(ls "$WORK"/dist/*.whl 2>/dev/null | head -n1)
[ -n "$WHEEL" ] || finish 0 "the build produced no wheel"
"$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEEL" >>"$LOG" 2>&1 || finish 0 "pip could not install $WHEEL"
(cd /tmp && PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
  "import MinkowskiEngine as ME, sys; sys.exit(0 if ME.is_cuda_available() else 'built without CUDA')") >>"$LOG" 2>&1 \
  || finish 0 "built but does not import with CUDA: $(tail -n1 "$LOG")"
mkdir -p "$OUT_DIR/wheel" && cp "$WHEEL" "$OUT_DIR/wheel/"  # kept: a later run on such a machine installs it (ME_WHEEL)
finish 1 "built and imports with CUDA" "$(basename "$WHEEL")"
