#!/usr/bin/env bash
# Compile-checks the CUDA code without a GPU, so CI catches CUDA errors on CPU machines:
#  1. every csrc/*.cu with plain nvcc and the flags torch's CUDAExtension adds
#     (-D__CUDA_NO_HALF_CONVERSIONS__ etc.), for each arch; any error or warning fails, and the
#     registers and spills of every kernel are printed;
#  2. the CUDA branch of csrc/bindings.cpp (-DKDENGINE_WITH_CUDA) against torch's headers, when a
#     python with torch is found ($PYTHON, else .venv/bin/python).
#   bash scripts/check_cuda_compile.sh                                # sm_75, sm_80, sm_90
#   KDENGINE_CUDA_CHECK_ARCHS="90" NVCC=/opt/cuda/bin/nvcc bash scripts/check_cuda_compile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ ! -x "$nvcc" ]; then
  echo "check_cuda_compile: nvcc not found at '$nvcc' (put it on PATH or set NVCC)" >&2
  exit 1
fi
archs="${KDENGINE_CUDA_CHECK_ARCHS:-75 80 90}"
torch_nvcc_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
: >"$work/log"
for cu in csrc/*.cu; do
  if ! "$nvcc" -c "$cu" -o "$work/$(basename "$cu").o" -std=c++17 -O3 -Werror all-warnings \
      "${torch_nvcc_flags[@]}" --resource-usage "${gencode[@]}" >>"$work/log" 2>&1; then
    cat "$work/log" >&2
    echo "check_cuda_compile: nvcc failed on $cu ($("$nvcc" --version | tail -1))" >&2
    exit 1
  fi
  echo "$cu compiles cleanly for sm_{${archs// /,}} ($("$nvcc" --version | grep -o 'release [0-9.]*'))"
done
# ptxas reports, per kernel and arch, "Compiling entry function '<mangled>' for 'sm_XX'" followed by
# the spill and register lines.
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
printf '%-6s %-34s %5s %s\n' arch kernel regs "spill stores/loads (bytes)"
sed -nE "s/.*Compiling entry function '([^']+)' for '(sm_[0-9]+a?)'.*/E \2 \1/p;
         s/.* ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads.*/S \1\/\2/p;
         s/.*Used ([0-9]+) registers.*/R \1/p" "$work/log" |
  while read -r tag a b; do
    case "$tag" in
      E) arch="$a"; name="$(echo "$b" | demangle | sed -E 's/.*::([a-z_]+_kernel<[^>]*>).*/\1/; s/__nv_bfloat16/bf16/; s/__half/fp16/; s/float/fp32/')" ;;
      S) spill="$a" ;;
      R) printf '%-6s %-34s %5s %s\n' "$arch" "$name" "$a" "$spill" ;;
    esac
  done

python="${PYTHON:-.venv/bin/python}"
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "check_cuda_compile: no python with torch ('$python'); skipped the CUDA branch of csrc/bindings.cpp"
  exit 0
fi
mapfile -t includes < <("$python" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()['include']]: print('-I' + p)")
# A CPU build of torch ships c10/cuda headers but not the one its CMake generates for CUDA builds.
mkdir -p "$work/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
includes+=(-I"$work/stub")
# nvcc may be a wrapper script: ask it where the CUDA headers are.
cuda_include="$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -nE 's/.*INCLUDES="(-I[^"]*)".*/\1/p' | head -n 1)"
if ! c++ -fsyntax-only -std=c++20 -Wall -Werror -DKDENGINE_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H \
    -DTORCH_EXTENSION_NAME=_C "${includes[@]}" "$cuda_include" csrc/bindings.cpp 2>"$work/bindings.log"; then
  cat "$work/bindings.log" >&2
  echo "check_cuda_compile: csrc/bindings.cpp (CUDA branch) does not compile" >&2
  exit 1
fi
echo "csrc/bindings.cpp compiles with -DKDENGINE_WITH_CUDA"
