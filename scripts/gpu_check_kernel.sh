#!/usr/bin/env bash
# GPU validation of the sparse-KL CUDA kernel, in one command, for a bare GPU machine (torch with
# CUDA, nvcc, ninja, compute-sanitizer; no network needed). From the repository root:
#
#   OUT=/some/dir bash scripts/gpu_check_kernel.sh              # all stages, ~5 min on an H100
#   OUT=/some/dir bash scripts/gpu_check_kernel.sh test bench   # a subset (the build is reused)
#
# Stages, each logged to $OUT/<stage>.log (default OUT: logs/gpu_check_kernel):
#   env       GPU, driver, nvcc, torch
#   build     python setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16 unless set)
#   ptxas     registers / spills per kernel for the card's arch (scripts/check_cuda_compile.sh)
#   test      tests/test_sparse_kl.py with the CUDA cases required (KDENGINE_REQUIRE_CUDA=1)
#   memcheck  compute-sanitizer --tool memcheck on small cases of the raw kernels
#   racecheck compute-sanitizer --tool racecheck on the same cases
#   bench     scripts/bench_sparse_kl.py --device cuda (tables as .md/.csv in $OUT)
# A failed stage does not stop the later ones (except a failed build); the exit code is non-zero if
# any stage failed. The summary table comes last. Per-stage time limits: KDENGINE_STAGE_TIMEOUT_<STAGE>.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-logs/gpu_check_kernel}"
mkdir -p "$out"
python="${PYTHON:-python}"
export PYTHON="$python"  # scripts/check_cuda_compile.sh checks bindings.cpp with it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" KDENGINE_FORCE_CUDA=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env build ptxas test memcheck racecheck bench)

declare -A status seconds
run_stage() {  # run_stage NAME DEFAULT_TIMEOUT_S COMMAND...
  local name=$1 limit=$2 start rc=0
  shift 2
  local var="KDENGINE_STAGE_TIMEOUT_${name^^}"
  limit="${!var:-$limit}"
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
  seconds[$name]=$(($(date +%s) - start))
  if [ $rc -eq 0 ]; then status[$name]=ok; elif [ $rc -eq 124 ]; then status[$name]="TIMEOUT"; else status[$name]="FAILED (rc $rc)"; fi
  tail -n 4 "$out/$name.log" | sed 's/^/   | /'
}

sanitize_case="$out/sanitize_case.py"
cat >"$sanitize_case" <<'EOF'
# Small cases of the raw CUDA ops (inputs built on the CPU, so the only kernels launched are ours):
# every dtype, tail on/off, CE at T = 1 and T != 1, odd V, a strided view, ignored rows, K > blockDim.
import torch
from kdengine import _C

def case(n, vocab, k, dtype, tail, alpha, temperature, strided=False):
    g = torch.Generator().manual_seed(n * vocab + k)
    x = (torch.randn(n, vocab, generator=g) * 3).to(dtype).cuda()
    if strided:  # rows of a wider tensor: unaligned row starts, stride != V
        x = torch.zeros(n, vocab + 3, dtype=dtype, device="cuda")[:, 1:vocab + 1].copy_(x)
    idx = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)]).int().cuda()
    logp = (torch.randn(n, k, generator=g).log_softmax(-1) - 0.1).cuda()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = -100
    labels[1::3] = idx[1::3, 0].cpu()
    labels = labels.cuda()
    loss, stats, topk_grad = _C.forward(x, idx, logp, labels, tail, alpha, temperature, -100)
    grad_rows = torch.linspace(0.5, 1.5, n, device="cuda")
    dx = _C.backward(grad_rows, x, idx, labels, stats, topk_grad, alpha, temperature, -100)
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all() and torch.isfinite(dx.float()).all(), (dtype, tail, alpha, temperature)

for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for tail in (False, True):
        case(7, 1031, 8, dtype, tail, 0.5, 2.0)
        case(5, 515, 4, dtype, tail, 0.5, 1.0, strided=True)
case(3, 1031, 300, torch.bfloat16, True, 1.0, 0.5)
case(2, 5, 5, torch.float32, True, 0.0, 1.0)
print("sanitizer cases ran")
EOF

sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
for stage in "${stages[@]}"; do
  case "$stage" in
    env) run_stage env 60 bash -c "nvidia-smi; nvcc --version; $python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'" ;;
    build) run_stage build 300 "$python" setup.py build_ext --inplace
           if [ "${status[build]}" != ok ]; then echo "build failed: see $out/build.log"; exit 1; fi ;;
    ptxas) archs="$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' ' | tr -d '.' | sed 's/+PTX//g')"
           run_stage ptxas 120 env KDENGINE_CUDA_CHECK_ARCHS="$archs" bash scripts/check_cuda_compile.sh ;;
    test) run_stage test 240 env KDENGINE_REQUIRE_CUDA=1 "$python" -m pytest -q -rs tests/test_sparse_kl.py ;;
    memcheck) run_stage memcheck 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 "$python" "$sanitize_case" ;;
    racecheck) run_stage racecheck 180 "$sanitizer" --tool racecheck --error-exitcode 1 "$python" "$sanitize_case" ;;
    bench) run_stage bench 420 "$python" scripts/bench_sparse_kl.py --device cuda --repeat 10 --out "$out" ;;
    *) echo "unknown stage '$stage' (env build ptxas test memcheck racecheck bench)"; exit 2 ;;
  esac
done

echo
echo "== summary (logs and tables in $out)"
printf '%-10s %-16s %6s\n' stage status seconds
failed=0
for stage in "${stages[@]}"; do
  printf '%-10s %-16s %6s\n' "$stage" "${status[$stage]}" "${seconds[$stage]}"
  [ "${status[$stage]}" = ok ] || failed=1
done
if [ -f "$out/test.log" ]; then grep -E "passed|failed" "$out/test.log" | tail -n 1; fi
if [ -f "$out/bench.log" ]; then sed -n '/^Summary:/,$p' "$out/bench.log"; fi
exit $failed
