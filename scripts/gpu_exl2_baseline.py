#!/usr/bin/env python
"""Where does EXL2's gap to the HF teacher come from? fp16-vs-fp32 noise of the HF model on the same GPU,
EXL2 against both, and EXL2 run twice on the same input (determinism), over GSM8K chat samples.

Prerequisites: a GPU machine where `scripts/gpu_check_exl2.py --stages build,hf,convert` filled WORK.
    PYTHONPATH=$PWD:scripts python scripts/gpu_exl2_baseline.py WORK gsm8k-test.jsonl [N]
"""
import argparse
import json

import torch

from gpu_check_exl2 import agreement_sums
from kdengine.teachers import load_teacher


def main(work: str, data: str, n: int = 48) -> None:
    rows = [json.loads(line) for line in open(data)][:n]
    hf32 = load_teacher(f"{work}/hf", backend="hf", device="cuda", dtype="fp32")
    hf16 = load_teacher(f"{work}/hf", backend="hf", device="cuda", dtype="fp16")
    exl2 = load_teacher(f"{work}/exl2-8.0", backend="exl2", device="cuda")

    def logits(teacher, ids):
        x = torch.tensor([ids], device=teacher.device)
        return teacher.logits(x, torch.tensor([len(ids)], device=teacher.device))[0].float()

    sums, repeat_maxdiff = {}, 0.0
    for row in rows:
        ids = hf32.tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}],
            tokenize=True, return_dict=False)
        a, b, c, c_again = logits(hf32, ids), logits(hf16, ids), logits(exl2, ids), logits(exl2, ids)
        for name, (ref, test) in {"hf16_vs_hf32": (a, b), "exl2_vs_hf32": (a, c), "exl2_vs_hf16": (b, c)}.items():
            for key, value in agreement_sums(ref, test, 64).items():
                sums.setdefault(name, {}).setdefault(key, 0.0)
                sums[name][key] += value
        repeat_maxdiff = max(repeat_maxdiff, (c - c_again).abs().max().item())
    for name, s in sums.items():
        print(name, {k: (v / s["n"] if k != "n" else int(v)) for k, v in s.items()})
    print("exl2_repeat_maxdiff", repeat_maxdiff)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="the directory gpu_check_exl2.py filled (hf/, exl2-8.0/)")
    ap.add_argument("data", help="GSM8K .jsonl (question, answer)")
    ap.add_argument("n", type=int, nargs="?", default=48, help="samples (default: 48)")
    args = ap.parse_args()
    main(args.work, args.data, args.n)
