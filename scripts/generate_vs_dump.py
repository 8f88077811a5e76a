"""The same student trained for (about) the same number of target tokens on three stores, then
compared on held-out GSM8K test problems:

    (a) reference   `kdengine dump` of the GSM8K reference answers to the train questions (logit KD)
    (b) generated   `kdengine generate` of the teacher's own answers to the same questions (logit KD)
    (c) seq-KD      the same generated store with `--alpha 0` (sequence-level KD: CE on the teacher's tokens)

Held-out: full-vocabulary KL to the teacher and top-1 agreement, teacher-forced on the reference
answers of the held-out problems (kdengine.evals.distill), and GSM8K accuracy (`kdengine eval gsm8k`,
chat, greedy). Every prompt is the one `kdengine eval gsm8k --chat` gives: a user turn
"Question: {q}\\nAnswer:".

Prerequisites: the generated store (`kdengine generate ... --chat --top-k 64`) and the teacher
directory. A heavy job: run it alone.

    python scripts/generate_vs_dump.py --teacher runs/smollm2_hf \\
        --generated runs/gen/store_gen --train-data runs/gen/train64.jsonl \\
        --heldout-data /work/shared/data/gsm8k/test.jsonl --heldout 32 --work runs/gen/compare \\
        --out scripts/results/generate_vs_dump.md
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from kdengine.store import open_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--generated", required=True, help="store written by kdengine generate --chat")
    ap.add_argument("--train-data", required=True, help="the GSM8K lines the generated store answered")
    ap.add_argument("--heldout-data", required=True)
    ap.add_argument("--heldout", type=int, default=32, help="first N problems of --heldout-data")
    ap.add_argument("--work", required=True)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--target-tokens", type=int, default=0,
                    help="training budget in target tokens [default: the smaller store's positions]")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--out", required=True, help="markdown table (a .json beside it)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    ref_store = work / "store_ref"
    _dump_reference(args, work, ref_store)
    student = work / "student"
    if not (student / "config.json").is_file():
        from kdengine.train.student import make_student

        make_student(args.teacher, layers=args.layers, layer_map="uniform", out=str(student))

    stores = {"a": ref_store, "b": Path(args.generated), "c": Path(args.generated)}
    stats = {name: _store_stats(path) for name, path in stores.items()}
    budget = args.target_tokens or min(s["positions"] for s in stats.values())
    runs = {}
    for name, alpha in (("a", 1.0), ("b", 1.0), ("c", 0.0)):
        runs[name] = _train(args, student, stores[name], work / f"train_{name}", alpha, budget, stats[name])

    heldout_gsm8k, heldout_chat = _heldout_files(args, work)
    kl = _heldout_kl(args.teacher, {n: work / f"train_{n}" / "final" for n in runs}, heldout_chat)
    accuracy = {}
    from kdengine.evals import evaluate_model

    for name in runs:
        _, report = evaluate_model(str(work / f"train_{name}" / "final"), heldout_gsm8k, chat=True, batch_size=16,
                                   max_new_tokens=args.max_new_tokens, log_dir=work / f"gsm8k_{name}",
                                   progress=False)
        accuracy[name] = (report["correct"], report["n"])
    _, teacher_report = evaluate_model(args.teacher, heldout_gsm8k, chat=True, batch_size=16,
                                       max_new_tokens=args.max_new_tokens, log_dir=work / "gsm8k_teacher",
                                       progress=False)
    _write(args, stats, runs, kl, accuracy, (teacher_report["correct"], teacher_report["n"]), budget,
           time.perf_counter() - started)


def _dump_reference(args, work: Path, store: Path) -> None:
    from kdengine.dump import DumpConfig, dump

    lines = [json.loads(line) for line in Path(args.train_data).read_text().splitlines() if line.strip()]
    data = work / "reference.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question: {r['question']}\nAnswer:", "response": r["answer"]})
                            + "\n" for r in lines))
    manifest = open_store(args.generated).manifest
    dump(DumpConfig(teacher=args.teacher, data=str(data), out=str(store), top_k=manifest["k"], chat=True,
                    batch_size=8, progress=False))


def _store_stats(path: Path) -> dict:
    m = open_store(path).manifest
    return {"samples": m["samples"], "tokens": m["tokens"], "positions": m["positions"],
            "bytes_per_position": m["payload_bytes"] / m["positions"]}


def _train(args, student: Path, store: Path, out: Path, alpha: float, budget: int, stats: dict) -> dict:
    from kdengine.train import main as train_main

    steps = _steps_for(store, budget, args.batch_tokens)
    if not (out / "final" / "config.json").is_file():
        train_main(["--student", str(student), "--store", str(store), "--out", str(out), "--steps", str(steps),
                    "--lr", str(args.lr), "--batch-tokens", str(args.batch_tokens), "--alpha", str(alpha),
                    "--seed", "0", "--log-every", "1", "--eval-every", "0", "--save-every", "0",
                    "--keep-checkpoints", "1", "--workers", "0", "--eval-fraction", "0.01"], prog="generate_vs_dump")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {"steps": len(metrics), "targets": sum(m["targets"] for m in metrics), "alpha": alpha,
            "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"]}


def _steps_for(store_dir: Path, budget: int, batch_tokens: int, seed: int = 0, eval_fraction: float = 0.01) -> int:
    """Optimizer steps after which the trainer (same seed, split and batching) has seen >= budget targets."""
    from kdengine.train.data import BatchSchedule, DataPosition, split_heldout

    store = open_store(store_dir)
    samples = [store[i] for i in range(len(store))]
    lengths = [len(s["input_ids"]) for s in samples]
    train_ids, _ = split_heldout(len(store), eval_fraction, seed)
    schedule = BatchSchedule(train_ids, lengths, batch_tokens, seed)
    seen, steps = 0, 0
    for pos in schedule.rank_positions(DataPosition(0, 0), 10 ** 6, 1, 1, 0):
        seen += sum(len(samples[i]["positions"]) for i in schedule.batches_at(pos))
        steps += 1
        if seen >= budget:
            return steps
    raise AssertionError("unreachable")


def _heldout_files(args, work: Path) -> tuple[Path, Path]:
    with open(args.heldout_data, encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(args.heldout)]
    gsm8k = work / "heldout_gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    chat = work / "heldout_chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": f"Question: {r['question']}\nAnswer:", "response": r["answer"]})
                            + "\n" for r in rows))
    return gsm8k, chat


def _heldout_kl(teacher_dir: str, students: dict, data: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from kdengine.corpus import load_corpus
    from kdengine.evals.distill import distill_metrics
    from kdengine.teachers import load_teacher

    teacher = load_teacher(teacher_dir, dtype="fp32")
    samples = load_corpus(data, teacher.tokenizer, chat=True).samples
    models = {n: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for n, p in students.items()}
    metrics = distill_metrics(teacher, models, samples, batch_size=8, progress=False)
    return {n: {"kl": metrics[n].kl_to_teacher, "top1": metrics[n].top1_agreement, "positions": metrics[n].positions}
            for n in students}


def _write(args, stats, runs, kl, accuracy, teacher_accuracy, budget, wall) -> None:
    names = {"a": "(a) dump of the reference answers, alpha 1", "b": "(b) generated answers, alpha 1",
             "c": "(c) generated answers, alpha 0 (sequence-level KD)"}
    load = os.getloadavg()
    lines = [
        "# Reference answers vs the teacher's own answers vs sequence-level KD",
        "",
        f"Command: `python scripts/generate_vs_dump.py {' '.join(os.sys.argv[1:])}`",
        "",
        f"Teacher {args.teacher}, student: {args.layers} of its layers (make-student "
        f"uniform), lr {args.lr}, {args.batch_tokens} batch tokens, budget {budget} target tokens per run. "
        f"Held-out: the first {args.heldout} problems of {args.heldout_data}; KL/top-1 teacher-forced on their "
        f"reference answers; GSM8K chat, greedy, max {args.max_new_tokens} new tokens (teacher: "
        f"{teacher_accuracy[0]}/{teacher_accuracy[1]}). CPU, {torch.get_num_threads()} threads, load average at the "
        f"end {load[0]:.2f}; wall {wall / 60:.1f} min.",
        "",
        "| run | store samples | store positions | steps | targets seen | loss first -> last | held-out KL to teacher "
        "| top-1 agreement | GSM8K |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in ("a", "b", "c"):
        r, s = runs[n], stats[n]
        lines.append(f"| {names[n]} | {s['samples']} | {s['positions']} | {r['steps']} | {r['targets']} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {kl[n]['kl']:.4f} | {kl[n]['top1']:.4f} | "
                     f"{accuracy[n][0]}/{accuracy[n][1]} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"stats": stats, "runs": runs, "heldout": kl, "gsm8k": accuracy, "teacher_gsm8k": teacher_accuracy,
         "budget": budget, "wall_s": wall}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
