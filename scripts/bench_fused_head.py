"""Benchmark: the fused output head + sparse KL (sparse_kl_linear) against the unfused head then sparse_kl.

Prerequisites: the extension built (`python setup.py build_ext --inplace`, PYTHONPATH=.).

    python scripts/bench_fused_head.py                     # CPU: N=8192 H=576 V=49152, fp32 then bf16

Both compute the same loss and gradients (hidden, weight) of `sparse_kl(hidden @ weight.T, ...)`
(tail on, T = 1, alpha = 0.5 with labels: the trainer's mix). Time: forward + backward, contenders
alternating run by run in one process, median. Peak extra memory: each variant in its own fresh
process (peak RSS during one forward + backward beyond what lived before, minus the gradients
of hidden and weight, which both paths return). Tables to scripts/results/fused_head_cpu.{md,csv}.
Not run on a GPU here; on one, pass --device cuda (N=16384, V=128256, bf16) for the same table
(torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdengine.losses import sparse_kl, sparse_kl_linear  # noqa: E402
from kdengine.evals.bench import cpu_model  # noqa: E402
from scripts.bench_sparse_kl import write_tables  # noqa: E402

OPTIONS = dict(tail=True, alpha=0.5, reduction="sum")


def make_inputs(n, hidden_size, vocab, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5 * 3).to(dtype).to(device).requires_grad_()
    idx = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(min(n, 64))]).repeat(-(-n // 64), 1)[:n]
    logp = (torch.randn(n, k, generator=g).log_softmax(-1) + torch.log(torch.tensor(0.9))).float()
    labels = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, idx.to(device), logp.to(device), labels.to(device)


def fused(hidden, weight, idx, logp, labels, chunk_rows):
    return sparse_kl_linear(hidden, weight, idx, logp, labels, chunk_rows=chunk_rows, **OPTIONS)


def unfused(hidden, weight, idx, logp, labels, chunk_rows):
    return sparse_kl(hidden @ weight.t(), idx, logp, labels, **OPTIONS)


VARIANTS = {"unfused (head, then sparse_kl)": unfused, "fused (sparse_kl_linear)": fused}


def step(fn, hidden, weight, *rest):
    hidden.grad = weight.grad = None
    fn(hidden, weight, *rest).backward()
    if hidden.is_cuda:
        torch.cuda.synchronize()


def _rss_mib(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_extra_mib(name, args):
    """Run in a fresh process: one warm-up, then the peak beyond what lived before, minus the gradients."""
    dtype = getattr(torch, args.dtype_now)
    hidden, weight, *rest = make_inputs(args.n, args.h, args.v, args.k, dtype, args.device)
    fn = VARIANTS[name]
    step(fn, hidden, weight, *rest, args.chunk_rows)
    grads = (hidden.grad.numel() * hidden.grad.element_size() + weight.grad.numel() * weight.grad.element_size()) / 2**20
    hidden.grad = weight.grad = None
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        step(fn, hidden, weight, *rest, args.chunk_rows)
        return torch.cuda.max_memory_allocated() / 2**20 - before - grads
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss_mib("VmRSS")
    step(fn, hidden, weight, *rest, args.chunk_rows)
    return _rss_mib("VmHWM") - before - grads


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, help="rows (default 8192 on CPU, 16384 on CUDA)")
    p.add_argument("--h", type=int, default=576, help="hidden size (default: 576, SmolLM2-135M)")
    p.add_argument("--v", type=int, help="vocabulary (default 49152 on CPU, 128256 on CUDA)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--dtypes", help="comma-separated (default: float32,bfloat16 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "scripts" / "results")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: measure one variant in this process
    p.add_argument("--dtype-now", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.n = args.n or (16384 if args.device == "cuda" else 8192)
    args.v = args.v or (128256 if args.device == "cuda" else 49152)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_extra_mib": peak_extra_mib(args.memory_of, args)}))
        return
    dtypes = (args.dtypes or ("bfloat16" if args.device == "cuda" else "float32,bfloat16")).split(",")
    load_at_start = os.getloadavg()
    rows, summary = [], []
    for dtype_name in dtypes:
        hidden, weight, *rest = make_inputs(args.n, args.h, args.v, args.k, getattr(torch, dtype_name), args.device)
        for fn in VARIANTS.values():
            step(fn, hidden, weight, *rest, args.chunk_rows)  # warm-up
        times = {name: [] for name in VARIANTS}
        for _ in range(args.repeat):
            for name, fn in VARIANTS.items():
                t0 = time.perf_counter()
                step(fn, hidden, weight, *rest, args.chunk_rows)
                times[name].append((time.perf_counter() - t0) * 1e3)
        del hidden, weight, rest
        mem = {}
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--memory-of", name, "--dtype-now", dtype_name, "--device", args.device,
                   "--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--k", str(args.k),
                   "--chunk-rows", str(args.chunk_rows), "--threads", str(args.threads)]
            mem[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["peak_extra_mib"]
        base = list(VARIANTS)[0]
        for name in VARIANTS:
            rows.append(dict(dtype=dtype_name, variant=name, fwd_bwd_ms=round(statistics.median(times[name]), 1),
                             time_vs_unfused=f"{statistics.median(times[name]) / statistics.median(times[base]):.2f}x",
                             peak_extra_mib=round(mem[name], 1),
                             extra_mem_vs_unfused=f"{100 * mem[name] / max(mem[base], 1e-9):.1f}%"))
        f = rows[-1]
        summary.append(f"{dtype_name}: fused fwd+bwd {f['fwd_bwd_ms']} ms = {f['time_vs_unfused']} the unfused time; "
                       f"peak extra memory {f['peak_extra_mib']} MiB = {f['extra_mem_vs_unfused']} of the unfused path's")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU: {cpu_model()}"
    header = [
        f"N={args.n} rows, H={args.h}, V={args.v}, K={args.k}, chunk_rows={args.chunk_rows}; loss options {OPTIONS} "
        "with labels; the gradients of hidden and weight",
        f"{device}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}",
        f"time: median of {args.repeat} forward+backward runs after a warm-up, variants alternating",
        "peak extra memory: each variant in a fresh process, peak RSS (CUDA: max_memory_allocated) during one "
        "forward+backward beyond what lived before, minus the returned gradients",
        f"load average: {load_at_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores",
        f"measured {datetime.datetime.now():%Y-%m-%d %H:%M}",
    ]
    cols = ["dtype", "variant", "fwd_bwd_ms", "time_vs_unfused", "peak_extra_mib", "extra_mem_vs_unfused"]
    stem = "fused_head_cpu" if args.device == "cpu" else "fused_head_cuda_" + re.sub(r"[^a-z0-9]+", "_", device.lower())
    print(write_tables(args.out, stem, "Fused output head + sparse KL vs unfused", header, cols, rows))
    print("\nSummary:\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
