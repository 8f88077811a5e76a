#!/usr/bin/env python
"""One training step, online teacher vs store, split into its parts: data (store decode + collate, or
corpus collate), teacher forward (online: the teacher's decoder and head at the target rows, plus the
top-k selection for --online-top-k), student forward, loss forward + backward (to the logits), and
student backward. Same student, same batches; contenders alternate, each repeat over every batch.

Prerequisites: a run of scripts/online_yardstick.py (its teacher, student, store and train.jsonl).
    python scripts/bench_online_step.py --root /tmp/online_yardstick
Writes scripts/results/online_step_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kdengine.evals.bench import cpu_model  # noqa: E402

PARTS = ("data", "teacher", "student_fwd", "loss", "student_bwd")
MODES = ("store top-64", "online top-64", "online dense")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/online_yardstick")
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--results", default=str(REPO / "scripts" / "results" / "online_step_cpu.md"))
    args = p.parse_args()
    root = Path(args.root)

    from transformers import AutoModelForCausalLM

    from kdengine.losses import sparse_kl
    from kdengine.losses.dense_kl import dense_kl
    from kdengine.store import open_store
    from kdengine.train.data import collate, plan_batches
    from kdengine.train.model import TargetLogits
    from kdengine.train.sources import OnlineSource

    store = open_store(root / "store")
    online = OnlineSource(teacher=str(root / "teacher"), data=str(root / "train.jsonl"), device=torch.device("cpu"),
                          dtype="fp32", chat=True, max_length=None, top_k=0, tail=False,
                          progress=False)
    assert online.num_samples == len(store)
    batches = plan_batches(list(range(len(store))), online.lengths, args.batch_tokens, seed=0)[:args.batches]
    model = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
    model.config.use_cache = False
    head = TargetLogits(model).train()
    corpus_batches = online.batches(lambda key: key, pad_id=0)

    def step(mode: str, ids: list[int]) -> dict:
        t = {}
        clock = time.perf_counter()
        if mode == "store top-64":
            b = collate([store[i] for i in ids], pad_id=0)
        else:
            b = corpus_batches[ids]
        t["data"] = time.perf_counter() - clock
        clock = time.perf_counter()
        if mode == "store top-64":
            target = (b["topk_idx"], b["topk_logp"])
        else:
            teacher_logits, _ = online.teacher_outputs(b)
            if mode == "online top-64":
                from kdengine.teachers import topk_logprobs

                top = topk_logprobs(teacher_logits, args.top_k)
                target = (top.idx, top.logp)
            else:
                target = teacher_logits
        t["teacher"] = time.perf_counter() - clock
        clock = time.perf_counter()
        logits = head(b["input_ids"], b["attention_mask"], b["rows"])
        t["student_fwd"] = time.perf_counter() - clock
        clock = time.perf_counter()
        leaf = logits.detach().requires_grad_(True)
        if mode == "online dense":
            loss = dense_kl(leaf, target, b["labels"], reduction="sum")
        else:
            loss = sparse_kl(leaf, *target, b["labels"], reduction="sum")
        loss.backward()
        t["loss"] = time.perf_counter() - clock
        clock = time.perf_counter()
        logits.backward(leaf.grad)
        model.zero_grad(set_to_none=True)
        t["student_bwd"] = time.perf_counter() - clock
        t["tokens"] = b["tokens"]
        return t

    for ids in batches[:1]:  # warm-up
        for mode in MODES:
            step(mode, ids)
    times = {m: {part: [] for part in PARTS} for m in MODES}
    tokens = sum(corpus_batches[ids]["tokens"] for ids in batches)
    for _ in range(args.repeats):
        for ids in batches:
            for mode in MODES:
                t = step(mode, ids)
                for part in PARTS:
                    times[mode][part].append(t[part])
    per_repeat = {m: {part: sum(v) / args.repeats for part, v in parts.items()} for m, parts in times.items()}
    medians = {m: {part: statistics.median(v) for part, v in parts.items()} for m, parts in times.items()}
    _report(args, per_repeat, medians, tokens, batches, store)


def _report(args, per_repeat: dict, medians: dict, tokens: int, batches: list, store) -> None:
    load = os.getloadavg()
    cpu = cpu_model()
    store_total = sum(per_repeat["store top-64"].values())
    lines = [
        "# Online vs store training step, split by part (scripts/bench_online_step.py)",
        "",
        f"`python scripts/bench_online_step.py --root {args.root} --batch-tokens "
        f"{args.batch_tokens} --batches {args.batches} --repeats {args.repeats}`",
        "",
        f"CPU: {cpu}; torch threads {torch.get_num_threads()}; load average {load[0]:.1f}, {load[1]:.1f}, "
        f"{load[2]:.1f} (a shared machine). Teacher SmolLM2-135M-Instruct fp32 (30 layers), student 15 of its "
        f"layers, fp32, the yardstick's store ({store.codec}, K={store.k}). {len(batches)} batches of at most "
        f"{args.batch_tokens} padded tokens ({tokens} tokens in all), each mode run on every batch, alternating, "
        f"{args.repeats} repeats. Seconds per pass over the {len(batches)} batches (mean of the repeats):",
        "",
        "| mode | data | teacher forward | student forward | loss fwd+bwd | student backward | step | tokens/s | "
        "vs store step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        t = per_repeat[mode]
        total = sum(t.values())
        lines.append(f"| {mode} | {t['data']:.3f} | {t['teacher']:.3f} | {t['student_fwd']:.3f} | {t['loss']:.3f} | "
                     f"{t['student_bwd']:.3f} | {total:.3f} | {tokens / total:.0f} | {total / store_total:.2f}x |")
    teacher_share = per_repeat["online dense"]["teacher"] / sum(per_repeat["online dense"].values())
    lines += [
        "",
        f"Reading: online dense spends {teacher_share:.0%} of its step in the teacher's forward. Dumping pays "
        "off once a store is reused: a dump costs about one teacher forward per token (plus encoding on a worker "
        "thread), once, and every later student trains at the store step's cost.",
        "",
    ]
    text = "\n".join(lines)
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
