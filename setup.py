"""Builds kdengine._C (the sparse-KL kernels and the store's top-k coder) against the installed torch.

    pip install -e . --no-build-isolation          # or, for a work tree: python setup.py build_ext --inplace

Build isolation would compile against a different torch than the one you run (pip would fetch its
own, CUDA build included), so torch must be installed first and isolation turned off.

The CPU kernels and the top-k coder are always built. The CUDA kernels are added when torch has CUDA
and nvcc is found, unless KDENGINE_SKIP_CUDA is set. Switches (environment):
  KDENGINE_SKIP_CUDA=1    build the CPU kernels only
  KDENGINE_FORCE_CUDA=1   fail instead of falling back to CPU-only when torch's CUDA or nvcc is missing
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "9.0" or "8.0;9.0" (default: torch's choice, the visible GPUs)
  MAX_JOBS                parallel compile jobs (default: from the cores and the free memory)
"""
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - only without torch
    raise SystemExit(
        "kdengine's extension is compiled against the installed torch: install torch first, then "
        "`pip install --no-build-isolation -e .`"
    ) from e

SKIP_CUDA = bool(os.environ.get("KDENGINE_SKIP_CUDA"))
FORCE_CUDA = os.environ.get("KDENGINE_FORCE_CUDA") == "1"


def _cuda_choice():
    """(build CUDA?, reason) from torch's CUDA, nvcc and the switches."""
    if SKIP_CUDA:
        return False, "KDENGINE_SKIP_CUDA is set"
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} was built without CUDA"
    elif CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        missing = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if missing and FORCE_CUDA:
        raise SystemExit(f"kdengine: KDENGINE_FORCE_CUDA=1 but {missing}; check `nvcc -V` and torch.version.cuda")
    if missing:
        return False, missing
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def _default_max_jobs():
    """Parallel jobs: one per core, at most one per 3 GiB of available memory (nvcc is hungry)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return max(1, min(cores, avail_kib // (3 * 1024 * 1024)))
    except (OSError, StopIteration):
        return cores


def _extension():
    with_cuda, reason = _cuda_choice()
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    sources = ["csrc/bindings.cpp", "csrc/sparse_kl_cpu.cpp", "csrc/sampled_kl_cpu.cpp", "csrc/topk_codec.cpp",
               "csrc/topk_codec_bindings.cpp", "csrc/sqrt_streams.cpp"]
    # -fno-trapping-math: without it GCC keeps a branch for each select of the kernels' inner loops
    # (exp2_fast's clamp and flush) and leaves the AVX2 and SSE clones scalar; only the AVX-512 one,
    # with masked lanes, vectorized. Nothing here reads the floating-point exception flags.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "<unset: torch's default for the visible GPUs>")
    print(
        f"kdengine: building the sparse-KL extension for CPU{' + CUDA' if with_cuda else ' only'} ({reason}); "
        f"MAX_JOBS={os.environ['MAX_JOBS']}" + (f", TORCH_CUDA_ARCH_LIST={arch}" if with_cuda else ""),
        flush=True,
    )
    if not with_cuda:
        return CppExtension("kdengine._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return CUDAExtension(
        "kdengine._C",
        sources + ["csrc/sparse_kl_cuda.cu", "csrc/sampled_kl_cuda.cu"],
        define_macros=[("KDENGINE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "-DKDENGINE_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
