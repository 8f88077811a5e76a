#!/usr/bin/env bash
# Compile-checks the CUDA kernel with plain nvcc: no torch, no GPU needed, so CI runs it on CPU
# machines. Any nvcc error or warning fails; the registers and spills of every kernel are printed.
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
gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! "$nvcc" -c csrc/sparse_kl_cuda.cu -o "$work/sparse_kl_cuda.o" -std=c++17 -O3 -Werror all-warnings \
    --resource-usage "${gencode[@]}" >"$work/log" 2>&1; then
  cat "$work/log" >&2
  echo "check_cuda_compile: nvcc failed on csrc/sparse_kl_cuda.cu ($("$nvcc" --version | tail -1))" >&2
  exit 1
fi
echo "csrc/sparse_kl_cuda.cu compiles cleanly for sm_{${archs// /,}} ($("$nvcc" --version | grep -o 'release [0-9.]*'))"
# ptxas reports, per kernel and arch, "Compiling entry function '<mangled>' for 'sm_XX'" followed by
# the spill and register lines.
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
printf '%-6s %-34s %5s %s\n' arch kernel regs "spill stores/loads (bytes)"
sed -nE "s/.*Compiling entry function '([^']+)' for '(sm_[0-9]+)'.*/E \2 \1/p;
         s/.* ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads.*/S \1\/\2/p;
         s/.*Used ([0-9]+) registers.*/R \1/p" "$work/log" |
  while read -r tag a b; do
    case "$tag" in
      E) arch="$a"; name="$(echo "$b" | demangle | sed -E 's/.*::([a-z_]+_kernel<[^>]*>).*/\1/; s/__nv_bfloat16/bf16/; s/__half/fp16/; s/float/fp32/')" ;;
      S) spill="$a" ;;
      R) printf '%-6s %-34s %5s %s\n' "$arch" "$name" "$a" "$spill" ;;
    esac
  done
