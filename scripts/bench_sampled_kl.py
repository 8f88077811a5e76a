"""Benchmark: the sampled-target KL kernel (RS-KD) against its plain-torch reference and the top-k kernel.

Prerequisites: the extension built (`python setup.py build_ext --inplace` in a work tree, PYTHONPATH=.).

    python scripts/bench_sampled_kl.py        # CPU: N=2048 V=49152 M=12 float32

Variants, alternated in one run on the same logits: `sampled_kl` (C++ kernel; 12 draws per row from
a random teacher, distinct ids padded to the row maximum), `sparse_kl` top-12 with the tail bucket
(the kernel a top-12 store trains with), and the sampled reference (log_softmax -> gather, autograd).
Timing and memory helpers are scripts/bench_sparse_kl.py's (median of --repeat runs, process CPU
time, peak RSS beyond the logits and their gradient). Table: scripts/results/sampled_kl_cpu.md (+ .csv).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
from pathlib import Path

import torch

from kdengine.evals.bench import cpu_model
from kdengine.losses import sampled_kl, sparse_kl
from kdengine.losses.sampled_kl import sampled_extension_available
from kdengine.losses.sampled_reference import sampled_kl_reference
from kdengine.sampling import draw_targets

_spec = importlib.util.spec_from_file_location("bench_sparse_kl", Path(__file__).with_name("bench_sparse_kl.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=49152)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    if not sampled_extension_available("cpu"):
        raise SystemExit("kdengine._C has no sampled kernel: build it first (python setup.py build_ext --inplace)")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.n, args.v, generator=g) * 3).requires_grad_()
    teacher = torch.randn(args.n, args.v, generator=g) * 4
    draws = draw_targets(teacher, args.samples, generator=g)
    logp_all = teacher.log_softmax(-1)
    top = logp_all.topk(args.samples, dim=-1)
    del teacher, logp_all
    ids, counts, target = draws.ids, draws.counts, draws.logp
    variants = [
        ("kdengine sampled_kl (C++ kernel)", lambda x: sampled_kl(x, ids, counts, target)),
        (f"kdengine sparse_kl top-{args.samples} + tail (C++ kernel)",
         lambda x: sparse_kl(x, top.indices, top.values, tail=True)),
        ("plain torch (sampled_reference)", lambda x: sampled_kl_reference(x, ids, counts, target)),
    ]
    rows = []
    for name, fn in variants:
        fwd, _ = bench.time_cpu(fn, logits, backward=False, repeat=args.repeat)
        both, both_cpu = bench.time_cpu(fn, logits, repeat=args.repeat)
        rows.append(dict(variant=name, fwd_ms=round(fwd, 1), fwd_bwd_ms=round(both, 1),
                         fwd_bwd_cpu_ms=round(both_cpu, 1), peak_extra_mib=round(bench.peak_extra_cpu(fn, logits), 1)))
    ref = rows[-1]
    for r in rows:
        r["speedup_vs_ref"] = f"{ref['fwd_bwd_cpu_ms'] / r['fwd_bwd_cpu_ms']:.2f}x"
    header = [
        f"shape N={args.n}, V={args.v}, {args.samples} draws per row ({(counts > 0).sum().item() / args.n:.2f} distinct "
        f"ids per row, K={ids.shape[1]} slots), logits float32, T=1, alpha=1",
        f"CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}",
        f"median of {args.repeat} runs after 1 warm-up; speedup from process CPU time (all threads)",
        f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "peak extra memory: peak RSS beyond what lived before the call, minus the gradient",
        f"measured {datetime.datetime.now():%Y-%m-%d %H:%M}",
    ]
    cols = ["variant", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_cpu_ms", "speedup_vs_ref", "peak_extra_mib"]
    print(bench.write_tables(args.out, "sampled_kl_cpu", "Sampled-target KL (RS-KD), CPU: kernel vs plain torch",
                             header, cols, rows))


if __name__ == "__main__":
    main()
