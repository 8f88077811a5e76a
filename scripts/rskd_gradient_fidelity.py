"""How close is each sparse target's gradient to the dense forward-KL gradient, on the real teacher?

A light stand-in for the training comparison (scripts/rskd_quality.py): at every target position of
a few GSM8K problems, the gradient w.r.t. the student's logits of (a) top-64 + tail, (b) top-12 +
tail, (c) sampled-12 (RS-KD, one draw set, and the mean over --draw-sets independent ones), against
the dense forward KL's gradient q - p (T = 1), for two students: the untrained `make-student --layers 15`
(far from the teacher: q - p is dominated by q, and top-k's bias is small next to it) and a synthetic
near-teacher one, logits = the teacher's + N(0, 0.5^2) noise (a well-trained student: there the mass
top-k misplaces is a larger share of the gradient).
Reported over all positions: relative squared error sum ||g_hat - g||^2 / sum ||g||^2, and the mean
cosine between g_hat and g per position. For sampled targets the error is almost all variance
(E[g_hat] = g): the mean over R draw sets has error ~ 1/R of a single set's.

    python scripts/rskd_gradient_fidelity.py --teacher DIR --data problems.jsonl    # ~1 CPU-minute

Writes scripts/results/rskd_gradient_fidelity.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kdengine.corpus import load_corpus, padded_batches
from kdengine.losses import sampled_kl, sparse_kl
from kdengine.sampling import draw_targets
from kdengine.teachers import load_teacher
from kdengine.train.student import make_student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="teacher model directory (e.g. the demo's converted SmolLM2)")
    p.add_argument("--data", required=True, help="JSONL problems (question/answer), rendered with the chat template")
    p.add_argument("--student", default="/tmp/rskd_fidelity_student")
    p.add_argument("--layers", type=int, default=15)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--draw-sets", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rskd_gradient_fidelity.md")
    args = p.parse_args()
    torch.manual_seed(0)
    teacher = load_teacher(args.teacher)
    if not (Path(args.student) / "config.json").exists():
        make_student(args.teacher, layers=args.layers, layer_map="uniform", out=args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    samples = load_corpus(args.data, teacher.tokenizer, chat=True).samples
    t_rows, s_rows = [], []
    with torch.inference_mode():
        for b in padded_batches(samples, 4):
            t = teacher.logits(b.input_ids, b.lengths)[b.rows, b.cols]
            mask = (torch.arange(b.input_ids.shape[1])[None] < b.lengths[:, None]).long()
            s = student(input_ids=b.input_ids, attention_mask=mask).logits[b.rows, b.cols, :t.shape[-1]]
            t_rows.append(t.float())
            s_rows.append(s.float())
    t_logits = torch.cat(t_rows)
    logp = t_logits.log_softmax(-1)
    near = t_logits + 0.5 * torch.randn(t_logits.shape, generator=torch.Generator().manual_seed(1))
    rows = []
    for who, x in (("untrained student", torch.cat(s_rows)), ("near-teacher student", near)):
        rows += _compare(who, x, t_logits, logp, args)
    n = t_logits.shape[0]
    distinct = rows[-1][4]
    _write(args, teacher, samples, n, t_logits.shape[1], distinct, rows)


def _compare(who, x, t_logits, logp, args):
    dense = x.softmax(-1) - logp.exp()
    norm2 = float((dense.double() ** 2).sum())

    def grad(fn) -> torch.Tensor:
        xg = x.clone().requires_grad_()
        fn(xg).backward()
        return xg.grad

    def stats(g: torch.Tensor) -> tuple[float, float]:
        err = float(((g.double() - dense.double()) ** 2).sum()) / norm2
        cos = torch.nn.functional.cosine_similarity(g.double(), dense.double(), dim=-1).mean().item()
        return err, cos

    rows = []
    for k in (64, 12):
        top = logp.topk(k, dim=-1)
        rows.append((who, f"top-{k} + tail", *stats(grad(lambda v: sparse_kl(v, top.indices, top.values, tail=True,
                                                                        reduction="sum"))), 0))
    gen = torch.Generator().manual_seed(0)
    mean_g = torch.zeros_like(x)
    single = []
    distinct = 0
    for _ in range(args.draw_sets):
        d = draw_targets(t_logits, args.samples, generator=gen)
        distinct += int((d.counts > 0).sum())
        g = grad(lambda v: sampled_kl(v, d.ids, d.counts, d.logp, reduction="sum"))
        single.append(stats(g))
        mean_g += g / args.draw_sets
    err1 = sum(e for e, _ in single) / len(single)
    cos1 = sum(c for _, c in single) / len(single)
    per_pos = distinct / (x.shape[0] * args.draw_sets)
    rows.append((who, f"sampled-{args.samples}, one draw set (mean over {args.draw_sets})", err1, cos1, per_pos))
    rows.append((who, f"sampled-{args.samples}, mean of {args.draw_sets} draw sets", *stats(mean_g), per_pos))
    return rows


def _write(args, teacher, samples, n, vocab, distinct, rows):
    lines = [
        "# Gradient fidelity of sparse targets on the real teacher (scripts/rskd_gradient_fidelity.py)",
        "",
        f"`python scripts/rskd_gradient_fidelity.py --teacher {args.teacher} --data {args.data}`",
        "",
        f"Teacher {teacher.name}; students as above ({args.layers} layers). {len(samples)} problems, "
        f"{n} target positions, V = {vocab}; sampled-{args.samples}: {distinct:.2f} distinct "
        "ids per position. Error: sum over positions of ||g_hat - g||^2 / sum ||g||^2, g = q - p the dense forward-KL "
        "gradient of the student's logits at T = 1; cosine: mean over positions.",
        f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} (load average {os.getloadavg()[0]:.1f}; these are not timings).",
        "",
        "| student | targets | relative squared gradient error | mean cosine to the dense gradient |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {who} | {name} | {err:.4f} | {cos:.4f} |" for who, name, err, cos, _ in rows]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
