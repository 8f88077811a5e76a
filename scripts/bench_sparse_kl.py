"""Benchmark: the sparse-KL kernel against the plain-torch formula, forward + backward, same run.

Prerequisites: the extension built (`pip install --no-build-isolation -e .`, or in a work tree
`python setup.py build_ext --inplace` and PYTHONPATH=.).

    python scripts/bench_sparse_kl.py                     # CPU: N=4096 V=49152 K=64 float32, every divergence
    python scripts/bench_sparse_kl.py --compiled --dtypes float32,bfloat16   # + torch.compile(reference), bf16
    python scripts/bench_sparse_kl.py --device cuda       # CUDA: N=16384 V=128256 K=64 bfloat16, then the N x V sweep

The baseline is kdengine.losses.reference (log_softmax -> gather -> divergence over the top-k (+ tail)
buckets, float32, autograd). On CPU every mode of --modes runs (default: fkl without the tail, the
trainer's default; fkl, rkl and jsd with the tail at T = 1; fkl with the tail and CE mixed in at
T = 2), and within a mode the contenders alternate run by run, so load drifts hit them alike.
"Extra memory" is the peak beyond the logits and their gradient: peak RSS on CPU (reset through
/proc/self/clear_refs), torch.cuda.max_memory_allocated on CUDA. On CUDA it also measures the
device-to-device copy bandwidth of the card, the bandwidth floor of the op (two reads and one write
of N x V logits) and a dense KL (F.kl_div against a dense teacher) of the same shape. Tables
(markdown + CSV) go to scripts/results/ (or --out); a short summary is printed last.
"""
from __future__ import annotations

import argparse
import ctypes
import csv
import datetime
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdengine.evals.bench import cpu_model
from kdengine.losses import sparse_kl
from kdengine.losses.reference import sparse_kl_reference
from kdengine.losses.sparse_kl import extension_available

SWEEP_N = (2048, 8192, 32768)
SWEEP_V = (32000, 128256, 152064)


def make_inputs(n, vocab, k, dtype, device, seed=0):
    """Student logits (requires grad), k distinct teacher ids per row and their log-probs (teacher
    tail mass 0.1), built a few thousand rows at a time so no extra [N, V] float32 tensor lives."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(n, vocab, dtype=dtype, device=device)
    idx = torch.empty(n, k, dtype=torch.int64, device=device)
    for start in range(0, n, 2048):
        rows = slice(start, min(start + 2048, n))
        m = rows.stop - rows.start
        logits[rows] = torch.randn(m, vocab, generator=g, device=device).mul_(3)
        idx[rows] = torch.rand(m, vocab, generator=g, device=device).topk(k, dim=-1).indices
    logp = torch.randn(n, k, generator=g, device=device).log_softmax(-1) + torch.log(torch.tensor(0.9))
    return logits.requires_grad_(), idx, logp.float()


# CPU modes: name -> sparse_kl keywords (labels are passed to every call; alpha = 1 ignores them)
MODES = {
    "fkl": dict(),
    "fkl_tail": dict(tail=True),
    "rkl_tail": dict(tail=True, divergence="rkl"),
    "jsd_tail": dict(tail=True, divergence="jsd", beta=0.5),
    "fkl_tail_ce_T2": dict(tail=True, alpha=0.5, temperature=2.0),
}


def ours(logits, idx, logp):
    return sparse_kl(logits, idx, logp)


def reference(logits, idx, logp):
    return sparse_kl_reference(logits, idx, logp)


def dense_kl(logits, teacher_logp):
    """The dense alternative: a full [N, V] teacher distribution and F.kl_div, float32 math."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), teacher_logp.float(), log_target=True, reduction="batchmean")


def step(fn, logits, *args, backward=True):
    logits.grad = None
    loss = fn(logits, *args)
    if backward:
        loss.backward()
    return loss


def _time_once(fn, logits, *args, backward=True):
    w0, c0 = time.perf_counter(), time.process_time()
    step(fn, logits, *args, backward=backward)
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def time_alternating(contenders, logits, *args, backward=True, repeat=5):
    """{name: (median wall ms, median CPU ms)}: one warm-up each, then `repeat` rounds in which every
    contender runs once, in turn."""
    for fn in contenders.values():
        step(fn, logits, *args, backward=backward)
    times = {name: ([], []) for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            w, c = _time_once(fn, logits, *args, backward=backward)
            times[name][0].append(w)
            times[name][1].append(c)
    logits.grad = None
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


def time_cuda(fn, *args, warmup=3, repeat=10, **kw):
    for _ in range(warmup):
        fn(*args, **kw)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kw)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rss_mib(key):
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024


def peak_extra_cpu(fn, logits, *args):
    """Peak RSS during forward + backward beyond what lived before, minus the gradient (MiB)."""
    logits.grad = None
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so reusing them counts as new
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss_mib("VmRSS")
    step(fn, logits, *args)
    extra = _rss_mib("VmHWM") - before - logits.grad.numel() * logits.grad.element_size() / 2**20
    logits.grad = None
    return max(extra, 0.0)


def peak_extra_cuda(fn, logits, *args):
    logits.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(fn, logits, *args)
    torch.cuda.synchronize()
    grad_bytes = logits.grad.numel() * logits.grad.element_size()
    extra = (torch.cuda.max_memory_allocated() - before - grad_bytes) / 2**20
    logits.grad = None
    return max(extra, 0.0)


def copy_bandwidth_gbs(nbytes):
    """Device-to-device copy bandwidth (GB/s, read + write counted) on a buffer of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(dst.copy_, src, warmup=3, repeat=20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_tables(out_dir, stem, title, header_lines, columns, rows):
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", *[f"- {h}" for h in header_lines], "",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return "\n".join(md)


def bench_cpu(args):
    torch.set_num_threads(args.threads)
    n, vocab, k = args.n or 4096, args.v or 49152, args.k
    dtypes = (args.dtypes or args.dtype or "float32").split(",")
    load_at_start = os.getloadavg()
    rows, summary = [], []
    for dtype_name in dtypes:
        logits, idx, logp = make_inputs(n, vocab, k, getattr(torch, dtype_name), "cpu")
        labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
        for mode in args.modes.split(","):
            kw = MODES[mode]
            contenders = {
                "kernel": lambda x, i, lp, kw=kw: sparse_kl(x, i, lp, labels, **kw),
                "reference": lambda x, i, lp, kw=kw: sparse_kl_reference(x, i, lp, labels, **kw),
            }
            if args.compiled:
                torch._dynamo.reset()  # a fresh cache per case: the recompile limit (8) would fall back to eager
                compiled = torch.compile(sparse_kl_reference, dynamic=False)
                contenders["compiled reference"] = lambda x, i, lp, kw=kw, f=compiled: f(x, i, lp, labels, **kw)
                t0 = time.perf_counter()
                step(contenders["compiled reference"], logits, idx, logp)  # compile time excluded below
                compile_s = time.perf_counter() - t0
            fwd = time_alternating(contenders, logits, idx, logp, backward=False, repeat=args.repeat)
            both = time_alternating(contenders, logits, idx, logp, repeat=args.repeat)
            mode_rows = []
            for name, fn in contenders.items():
                mode_rows.append(dict(
                    dtype=dtype_name, mode=mode, variant=name, fwd_ms=round(fwd[name][0], 1),
                    fwd_bwd_ms=round(both[name][0], 1), fwd_bwd_cpu_ms=round(both[name][1], 1),
                    peak_extra_mib=round(peak_extra_cpu(fn, logits, idx, logp), 1),
                ))
            ref = mode_rows[1]
            for r in mode_rows:
                r["speedup_fwd_bwd"] = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x"
                r["speedup_cpu_time"] = f"{ref['fwd_bwd_cpu_ms'] / r['fwd_bwd_cpu_ms']:.2f}x"
                r["extra_mem_vs_ref"] = f"{100 * r['peak_extra_mib'] / max(ref['peak_extra_mib'], 1e-9):.2f}%"
            kernel = mode_rows[0]
            line = (f"{dtype_name} {mode}: kernel fwd+bwd {kernel['fwd_bwd_ms']} ms, speed-up over the reference "
                    f"{kernel['speedup_fwd_bwd']} (CPU time {kernel['speedup_cpu_time']}), extra memory "
                    f"{kernel['peak_extra_mib']} MiB vs {ref['peak_extra_mib']} MiB")
            if args.compiled:
                comp = mode_rows[2]
                line += (f"; over the compiled reference {comp['fwd_bwd_ms'] / kernel['fwd_bwd_ms']:.2f}x "
                         f"(compiled in {compile_s:.0f} s, excluded)")
            summary.append(line)
            rows += mode_rows
        del logits, idx, logp
    if "float32" in dtypes:
        for r in rows:
            base = next(b for b in rows if b["dtype"] == "float32" and b["mode"] == r["mode"] and b["variant"] == r["variant"])
            r["vs_fp32_time"] = f"{r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x"
    header = [
        f"shape N={n}, V={vocab}, K={k}, logits {', '.join(dtypes)}; modes: "
        + "; ".join(f"{m} = {MODES[m] or 'defaults (no tail, T=1, alpha=1)'}" for m in args.modes.split(",")),
        f"CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}",
        f"median of {args.repeat} runs after 1 warm-up, contenders alternating run by run; forward+backward "
        f"includes allocating the [N, V] gradient (THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')})",
        "cpu_ms: process CPU time (all threads), less disturbed than wall time on a shared machine",
        f"load average: {load_at_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores",
        "peak extra memory: peak RSS beyond what lived before the call, minus the gradient",
        "vs_fp32_time: this row's fwd+bwd time over the same contender's float32 time",
        f"measured {datetime.datetime.now():%Y-%m-%d %H:%M}",
    ]
    cols = ["dtype", "mode", "variant", "fwd_ms", "fwd_bwd_ms", "speedup_fwd_bwd", "fwd_bwd_cpu_ms", "speedup_cpu_time",
            "peak_extra_mib", "extra_mem_vs_ref", "vs_fp32_time"]
    table = write_tables(args.out, args.stem, "Sparse KL, CPU: kernel vs plain torch", header, cols, rows)
    print(table)
    return summary


def _cuda_case(n, vocab, k, dtype, bandwidth, with_reference, with_dense, repeat):
    """One CUDA shape: our time, achieved bandwidth and % of floor; reference / dense KL if asked (OOM tolerated)."""
    logits, idx, logp = make_inputs(n, vocab, k, dtype, "cuda")
    nbytes = n * vocab * logits.element_size()
    floor_ms = 3 * nbytes / (bandwidth * 1e9) * 1e3  # two reads of the logits and one write of dX
    ms = time_cuda(step, ours, logits, idx, logp, repeat=repeat)
    fwd_ms = time_cuda(step, ours, logits, idx, logp, backward=False, repeat=repeat)
    row = dict(N=n, V=vocab, K=k, dtype=str(dtype).replace("torch.", ""), fwd_ms=round(fwd_ms, 3),
               fwd_bwd_ms=round(ms, 3), achieved_gbs=round(3 * nbytes / (ms * 1e-3) / 1e9),
               floor_ms=round(floor_ms, 3), pct_of_floor=f"{100 * floor_ms / ms:.0f}%",
               extra_mib=round(peak_extra_cuda(ours, logits, idx, logp), 1))
    if with_reference:
        try:
            ref_ms = time_cuda(step, reference, logits, idx, logp, warmup=1, repeat=max(3, repeat // 3))
            row.update(ref_ms=round(ref_ms, 3), speedup_vs_ref=f"{ref_ms / ms:.1f}x",
                       ref_extra_mib=round(peak_extra_cuda(reference, logits, idx, logp), 1))
        except torch.cuda.OutOfMemoryError:
            row.update(ref_ms="OOM", speedup_vs_ref="-")
        logits.grad = None
        torch.cuda.empty_cache()
    if with_dense:
        try:
            teacher = torch.randn(n, vocab, device="cuda", dtype=dtype).log_softmax(-1).to(dtype)
            dense_ms = time_cuda(step, dense_kl, logits, teacher, warmup=1, repeat=max(3, repeat // 3))
            row.update(dense_kl_ms=round(dense_ms, 3), speedup_vs_dense=f"{dense_ms / ms:.1f}x")
            del teacher
        except torch.cuda.OutOfMemoryError:
            row.update(dense_kl_ms="OOM", speedup_vs_dense="-")
        logits.grad = None
    del logits, idx, logp
    torch.cuda.empty_cache()
    return row


def bench_cuda(args):
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_kl: --device cuda but torch.cuda.is_available() is False")
    if not extension_available("cuda"):
        raise SystemExit("bench_sparse_kl: kdengine._C has no CUDA kernels (rebuild with nvcc on PATH)")
    gpu = torch.cuda.get_device_name()
    dtype = getattr(torch, args.dtype or "bfloat16")
    n, vocab, k = args.n or 16384, args.v or 128256, args.k
    bandwidth = copy_bandwidth_gbs(n * vocab * dtype.itemsize)
    header = [
        f"GPU: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}",
        f"device-to-device copy bandwidth (read + write) measured on this card: {bandwidth:.0f} GB/s",
        "floor = (2 reads + 1 write of N x V logits) / copy bandwidth; pct_of_floor = floor / our time",
        f"times: CUDA events, median of {args.repeat} (reference/dense: fewer), forward+backward including "
        "validation and the gradient allocation; default mode (no tail, T=1, alpha=1)",
        f"measured {datetime.datetime.now():%Y-%m-%d %H:%M}",
    ]
    main = _cuda_case(n, vocab, k, dtype, bandwidth, True, True, args.repeat)
    cols = ["N", "V", "K", "dtype", "fwd_ms", "fwd_bwd_ms", "achieved_gbs", "floor_ms", "pct_of_floor", "extra_mib",
            "ref_ms", "speedup_vs_ref", "ref_extra_mib", "dense_kl_ms", "speedup_vs_dense"]
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    print(write_tables(args.out, f"sparse_kl_cuda_{slug}", f"Sparse KL, CUDA ({gpu})", header, cols, [main]))
    summary = [f"{gpu}: N={n} V={vocab} bf16 fwd+bwd {main['fwd_bwd_ms']} ms = {main['pct_of_floor']} of the "
               f"{main['floor_ms']} ms floor ({bandwidth:.0f} GB/s copy); reference {main.get('ref_ms')} ms "
               f"({main.get('speedup_vs_ref')}); dense KL {main.get('dense_kl_ms')} ms ({main.get('speedup_vs_dense')})"]
    if not args.no_sweep:
        sweep = [_cuda_case(sn, sv, k, dtype, bandwidth, True, False, args.repeat) for sn in SWEEP_N for sv in SWEEP_V]
        print(write_tables(args.out, f"sparse_kl_cuda_sweep_{slug}", f"Sparse KL, CUDA sweep ({gpu})", header,
                           [c for c in cols if not c.startswith("dense")], sweep))
        summary += [f"  N={r['N']:>6} V={r['V']:>6}: {r['fwd_bwd_ms']:>8} ms, {r['pct_of_floor']:>4} of floor, "
                    f"reference {r.get('ref_ms')} ms" for r in sweep]
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--n", type=int, help="rows N (default: 4096 on CPU, 16384 on CUDA)")
    parser.add_argument("--v", type=int, help="vocabulary V (default: 49152 on CPU, 128256 on CUDA)")
    parser.add_argument("--k", type=int, default=64, help="top-k K (default: 64)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="logits dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--dtypes", help="CPU: comma-separated logits dtypes, one table (e.g. float32,bfloat16)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"CPU: comma-separated modes of {list(MODES)}")
    parser.add_argument("--compiled", action="store_true",
                        help="CPU: add torch.compile(reference) as a contender (compile time excluded)")
    parser.add_argument("--stem", default="sparse_kl_cpu", help="CPU: file name of the tables (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per variant; the median is reported (default: 5)")
    parser.add_argument("--no-sweep", action="store_true", help="CUDA: skip the N x V sweep")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the .md/.csv tables (default: scripts/results)")
    args = parser.parse_args()
    summary = bench_cpu(args) if args.device == "cpu" else bench_cuda(args)
    print("\nSummary:\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
