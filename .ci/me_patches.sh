# shellcheck shell=bash
# Source patches for MinkowskiEngine 0.5.4 (the PyPI sdist), sourced by install.sh.
#   me_patch_python SRC   Python >= 3.10 / 3.12 fixes (every build)
#   me_patch_cuda SRC     CUDA 12/13 (CCCL thrust/cub, NVTX, runtime API) and torch 2.11 header fixes,
#                         plus setup.py's CUDA-13 include and --blas_library_dirs fixes (CUDA builds)
# SRC is the unpacked sdist (the folder holding setup.py). Apply each function once to a fresh
# unpack. Every edit checks that its target is there first and returns non-zero with a one-line
# message naming the file when it is not, so a changed sdist fails loudly instead of half-patching.
# Verified: with both applied, every source of the GPU build (18 .cu, 3 .cpp) compiles with nvcc
# 13.0.88 (CCCL from nvidia-cuda-cccl 13.0.85), torch 2.11.0+cu130 headers, g++ 12, -std=c++17,
# sm_90. Build options and environment: see the notes at the end of this file.

_me_fail() { echo "[me_patches] error: $*" >&2; }  # callers return 1 themselves

# _me_sed FILE PATTERN SCRIPT: run sed -i SCRIPT on FILE, after checking that the basic regex
# PATTERN matches some line of FILE.
_me_sed() {
  local file=$1 pattern=$2 script=$3
  [ -f "$file" ] || { _me_fail "$file: no such file"; return 1; }
  grep -q -- "$pattern" "$file" || { _me_fail "$file: patch target not found: $pattern"; return 1; }
  sed -i -- "$script" "$file"
}

# _me_prepend FILE LINE...: insert the lines at the top of FILE
_me_prepend() {
  local file=$1; shift
  [ -f "$file" ] || { _me_fail "$file: no such file"; return 1; }
  local tmp
  tmp=$(mktemp) && printf '%s\n' "$@" >"$tmp" && cat "$file" >>"$tmp" && cat "$tmp" >"$file" && rm -f "$tmp"
}

me_patch_python() {
  local src=${1:?me_patch_python SRC}
  local f
  [ ! -e "$src/.me_patched_python" ] || { _me_fail "$src: me_patch_python already applied"; return 1; }
  # Python >= 3.10 moved Sequence to collections.abc (fixed upstream after 0.5.4, PR #480).
  for f in MinkowskiCommon.py MinkowskiCoordinateManager.py MinkowskiTensorField.py utils/quantization.py; do
    _me_sed "$src/MinkowskiEngine/$f" '^from collections import Sequence$' \
      's/^from collections import Sequence$/from collections.abc import Sequence/' || return 1
  done
  _me_sed "$src/MinkowskiEngine/MinkowskiKernelGenerator.py" '^from collections import Sequence, namedtuple$' \
    's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' || return 1
  if grep -rn "^from collections import .*Sequence" "$src/MinkowskiEngine" >&2; then
    _me_fail "$src/MinkowskiEngine: unpatched 'from collections import Sequence' left"; return 1
  fi
  # Without --blas, setup.py probes BLAS with numpy.distutils, which numpy 2 removed on Python >= 3.12
  # (and which needed SETUPTOOLS_USE_DISTUTILS=stdlib on 3.11; on 3.12 that setting makes
  # `import setuptools` itself fail: no distutils in the stdlib). Default to OpenBLAS instead, so
  # setup.py runs even when --blas does not reach it (the metadata step, `pip download`).
  _me_sed "$src/setup.py" '^BLAS, argv = _argparse("--blas", argv, False)$' \
    's/^BLAS, argv = _argparse("--blas", argv, False)$/&\nBLAS = BLAS or "openblas"  # no numpy.distutils probe (gone on Python >= 3.12)/' || return 1
  touch "$src/.me_patched_python"
}

me_patch_cuda() {
  local src=${1:?me_patch_cuda SRC}
  local s=$src/src
  [ ! -e "$src/.me_patched_cuda" ] || { _me_fail "$src: me_patch_cuda already applied"; return 1; }
  # --- CUDA >= 12 (CCCL thrust): thrust algorithms and execution policies are no longer pulled in
  # transitively; include what each file uses (NVIDIA/MinkowskiEngine issues 543, 594, 601).
  _me_prepend "$s/convolution_kernel.cuh" '#include <thrust/execution_policy.h>' || return 1
  _me_prepend "$s/coordinate_map_gpu.cu" '#include <thrust/unique.h>' '#include <thrust/remove.h>' || return 1
  _me_prepend "$s/spmm.cu" '#include <thrust/execution_policy.h>' '#include <thrust/reduce.h>' '#include <thrust/sort.h>' || return 1
  _me_prepend "$s/3rdparty/concurrent_unordered_map.cuh" '#include <thrust/execution_policy.h>' || return 1
  # ME vendors an old copy of cudf's NVTX C++ wrapper, namespace ::nvtx3 (v0). CCCL's cub (CUDA
  # >= 12.x, and always in CUDA 13) includes the toolkit's <nvtx3/nvtx3.hpp>, whose ::nvtx3::v1 is
  # inline, so every nvtx3:: name becomes ambiguous ("nvtx3::domain is ambiguous", issues 543, 614;
  # prepending NVTX_DISABLE to the vendored header is too late: thrust is included before it). The
  # wrapper's only use is one profiling range, CUDF_FUNC_RANGE() in concurrent_unordered_map.cuh:
  # stop including the wrapper and make that macro empty.
  _me_sed "$s/3rdparty/concurrent_unordered_map.cuh" '^#include <cudf/detail/nvtx/ranges.hpp>$' \
    's|^#include <cudf/detail/nvtx/ranges.hpp>$|#define CUDF_FUNC_RANGE() /* NVTX range dropped: clashes with CUDA 13 nvtx3 */|' || return 1
  # CUDA 13 changed cudaMemPrefetchAsync(ptr, n, int device, stream) to take a cudaMemLocation and
  # flags: (ptr, n, location, flags, stream). Three calls in the vendored cudf hash map.
  local cum=$s/3rdparty/concurrent_unordered_map.cuh
  [ "$(grep -c 'cudaMemPrefetchAsync(.*, dev_id, stream)' "$cum")" = 3 ] \
    || { _me_fail "$cum: expected 3 cudaMemPrefetchAsync(..., dev_id, stream) calls"; return 1; }
  sed -i 's/cudaMemPrefetchAsync(\(.*\), dev_id, stream)/cudaMemPrefetchAsync(\1, ME_PREFETCH_TO_DEVICE(dev_id), stream)/' "$cum"
  _me_prepend "$cum" '#include <cuda_runtime_api.h>' \
    '#if CUDART_VERSION >= 13000' \
    '#define ME_PREFETCH_TO_DEVICE(d) cudaMemLocation{cudaMemLocationTypeDevice, (d)}, 0u' \
    '#else' \
    '#define ME_PREFETCH_TO_DEVICE(d) (d)' \
    '#endif' || return 1
  # create() returns unique_ptr<map, std::function deleter>, which ME assigns to a shared_ptr. With
  # CCCL 3, thrust::pair is cuda::std::pair, so libstdc++'s unqualified __to_address() in
  # shared_ptr(unique_ptr&&) finds cuda::std::__to_address by ADL too: "more than one instance of
  # overloaded function std::__to_address". Return the shared_ptr directly (same deleter).
  _me_sed "$cum" '^    return std::unique_ptr<Self, std::function<void(Self\*)>>{$' \
    's/^    return std::unique_ptr<Self, std::function<void(Self\*)>>{$/    return std::shared_ptr<Self>{/' || return 1
  # CCCL 3 (CUDA 13) removed thrust::unary_function / binary_function (deprecated in C++11 style
  # adaptable functors). find_coordinate only inherited typedefs that nothing reads (it is used by
  # thrust::transform, which deduces the result type from operator()): drop the base class.
  _me_sed "$s/coordinate_map_functors.cuh" '^    : public thrust::unary_function<uint32_t,$' \
    '/^    : public thrust::unary_function<uint32_t,$/{N;s/^.*\n *thrust::pair<uint32_t, uint32_t>> {$/    {/}' || return 1
  if grep -n "thrust::unary_function\|thrust::binary_function" -r "$s" >&2; then
    _me_fail "$s: thrust::unary_function/binary_function left (removed in CCCL 3)"; return 1
  fi
  # torch 2.11's ATen/cuda/CUDAUtils.h uses at::Tensor without including its definition
  # ("incomplete type at::Tensor is not allowed" in spmm.cu): include it first.
  local f
  for f in spmm.cu spmm.cuh broadcast_gpu.cu convolution_gpu.cu convolution_kernel.cu \
           convolution_transpose_gpu.cu direct_max_pool.cpp; do
    _me_sed "$s/$f" '^#include <ATen/cuda/CUDAUtils.h>$' \
      's|^#include <ATen/cuda/CUDAUtils.h>$|#include <ATen/core/Tensor.h>\n&|' || return 1
  done
  # CUDA 13 moved thrust/cub/libcu++ to $CUDA_HOME/include/cccl. nvcc adds it by itself, but the
  # GPU build also compiles quantization.cpp and direct_max_pool.cpp with g++, which include
  # <thrust/host_vector.h>, and torch's CUDAExtension only adds $CUDA_HOME/include. Add the folder
  # where it exists (harmless for CUDA 12, where it does not).
  _me_sed "$src/setup.py" '^include_dirs = \[\]$' \
    's|^include_dirs = \[\]$|&\
if not CPU_ONLY:  # CUDA 13: thrust lives in include/cccl, which g++ needs for the .cpp sources\
    from torch.utils.cpp_extension import CUDA_HOME as _TORCH_CUDA_HOME\
    _cccl = os.path.join(_TORCH_CUDA_HOME or "", "include", "cccl")\
    if os.path.isdir(_cccl):\
        include_dirs.append(_cccl)|' || return 1
  # setup.py's --blas_library_dirs builds "-Wl,-rpath,['DIR']" from the list and then never passes
  # extra_link_args to the Extension, so the option does nothing: make it add -L and an rpath for
  # each DIR (needed when OpenBLAS is unpacked outside the default linker paths).
  _me_sed "$src/setup.py" '^        extra_link_args += \[f"-Wl,-rpath,{BLAS_LIBRARY_DIRS}"\]$' \
    's|^        extra_link_args += \[f"-Wl,-rpath,{BLAS_LIBRARY_DIRS}"\]$|        extra_link_args += [f"-L{d}" for d in BLAS_LIBRARY_DIRS] + [f"-Wl,-rpath,{d}" for d in BLAS_LIBRARY_DIRS]|' || return 1
  _me_sed "$src/setup.py" '^        libraries=libraries,$' \
    's|^        libraries=libraries,$|&\n        extra_link_args=extra_link_args,|' || return 1
  touch "$src/.me_patched_cuda"
}

# Build notes for a CUDA build (setup.py itself needs no further edit; pass these):
# - CUDA_HOME: the CUDA 13.0 toolkit (bin/nvcc, include/, include/cccl/); its major version must
#   match torch.version.cuda. Without a visible GPU pass --force_cuda, else setup.py silently builds
#   CPU-only.
# - TORCH_CUDA_ARCH_LIST=9.0 for an H100/H200 only: each extra arch multiplies the build time.
# - MAX_JOBS: setup.py clips it to 12 only when unset; ninja runs that many nvcc at once.
# - Do NOT set SETUPTOOLS_USE_DISTUTILS=stdlib on Python >= 3.12 (no stdlib distutils: `import
#   setuptools` fails). me_patch_python makes it unnecessary (no numpy.distutils BLAS probe).
# - Build with --no-build-isolation --use-pep517 and the options as
#   --config-settings=--global-option=--force_cuda / --blas=openblas /
#   --blas_include_dirs=DIR[,DIR] / --blas_library_dirs=DIR[,DIR] (the last one only works with
#   me_patch_cuda's setup.py fix: it adds -L and an rpath for each DIR). libopenblas.so.0 itself
#   needs libgfortran.so.5 (and libquadmath.so.0) at import time: put their folder on
#   LD_LIBRARY_PATH where they are not installed system-wide (an rpath does not cover them).
# - torch's BuildExtension adds the -std flag (torch 2.11: -std=c++17; 2.14: -std=c++20); ME's
#   setup.py passes none of its own, so nothing to change there.
