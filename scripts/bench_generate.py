"""What capturing the teacher's top-k costs a generation run: tokens/s of the same greedy decoding
with no capture, with the top-k capture (kdengine.decode.TopKCapture), and the whole `generate`
into a store (capture + encoding + writing shards), alternated round by round in one process.

Prerequisites: a teacher directory (e.g. SmolLM2-135M-Instruct converted by `kdengine demo`) and a
GSM8K-format JSONL. Run it alone on the machine (it is a heavy job):

    python scripts/bench_generate.py --teacher runs/smollm2_hf \\
        --data /work/shared/data/gsm8k/train.jsonl --prompts 16 --max-new-tokens 96 --rounds 3 \\
        --out scripts/results/generate_throughput.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kdengine.decode import Sampling, TopKCapture, decode_batch
from kdengine.evals.bench import cpu_model
from kdengine.generate import GenerateConfig, _encode_prompt, generate, read_prompts
from kdengine.teachers import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--out", help="write the table here too (markdown)")
    args = ap.parse_args()

    teacher = load_teacher(args.teacher, backend="hf")
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    data = work / "prompts.jsonl"
    with open(args.data, encoding="utf-8") as src:
        data.write_text("".join(next(src) for _ in range(args.prompts)))
    lines = read_prompts(data)
    prompts = [_encode_prompt(line, teacher.tokenizer, args.chat, str(data)) for line in lines]

    def decode_only(capture):
        def run():
            tokens = 0
            for first in range(0, len(prompts), args.batch_size):
                batch = prompts[first:first + args.batch_size]
                out = decode_batch(teacher, batch, [None] * len(batch), sampling=Sampling(),
                                   max_new_tokens=args.max_new_tokens, capture=capture)
                tokens += sum(len(d.tokens) for d in out)
            return tokens
        return run

    def full_generate():
        out = work / "store"
        shutil.rmtree(out, ignore_errors=True)
        s = generate(GenerateConfig(teacher=args.teacher, data=str(data), out=str(out), top_k=args.top_k,
                                    chat=args.chat, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    shard_prompts=args.prompts, progress=False), teacher=teacher)
        return s.new_tokens

    contenders = {"generation alone": decode_only(None),
                  f"generation + top-{args.top_k} capture": decode_only(TopKCapture(args.top_k)),
                  "kdengine generate (capture + encode + write)": full_generate}
    times = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}  # process CPU time: the fair measure on a shared, loaded machine
    tokens = {}
    decode_only(None)()  # warm-up
    for _ in range(args.rounds):
        for name, run in contenders.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens[name] = run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    base = tokens["generation alone"] / min(times["generation alone"])
    base_cpu = tokens["generation alone"] / min(cpu["generation alone"])
    lines_out = [
        f"CPU: {platform.processor() or platform.machine()} ({cpu_model()}), torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}",
        f"teacher {args.teacher}, {args.prompts} prompts, batch {args.batch_size}, greedy, max {args.max_new_tokens} "
        f"new tokens, chat={args.chat}, {args.rounds} alternating rounds (best round shown)",
        "",
        "| contender | new tokens | best wall s | tokens/s (wall) | vs alone (wall) | best CPU s | tokens per CPU-s "
        "| vs alone (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in contenders:
        rate, rate_cpu = tokens[name] / min(times[name]), tokens[name] / min(cpu[name])
        lines_out.append(f"| {name} | {tokens[name]} | {min(times[name]):.2f} | {rate:.1f} | {rate / base:.3f} | "
                         f"{min(cpu[name]):.2f} | {rate_cpu:.1f} | {rate_cpu / base_cpu:.3f} |")
    table = "\n".join(lines_out)
    print(table)
    print(json.dumps({"wall_s": times, "cpu_s": cpu, "tokens": tokens}))
    if args.out:
        Path(args.out).write_text("# Generation throughput: the cost of capturing top-k\n\nCommand: `python "
                                  "scripts/bench_generate.py " + " ".join(sys.argv[1:]) + "`\n\n" + table + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
