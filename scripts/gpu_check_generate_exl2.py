"""GPU check of `kdengine generate --backend exl2` (never run here: this project's machine has no GPU).

Decodes the same prompts greedily through kdengine.decode with the HF teacher and with its EXL2
conversion (e.g. the 8.0 bpw directory scripts/gpu_check_exl2.py writes), batched, and reports how
many responses are identical, the step at which the first divergence happens, and per-step top-1
and top-k overlap of the captured targets over the common prefix; then runs `generate` end to end
with the exl2 backend into a store and verifies it.

    python scripts/gpu_check_generate_exl2.py --hf runs/smollm2_hf --exl2 work/exl2-8.0 \\
        --data gsm8k/test.jsonl --prompts 32 --batch-size 16 --max-new-tokens 128 --work work/gen
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kdengine.decode import Sampling, TopKCapture, decode_batch
from kdengine.generate import GenerateConfig, _encode_prompt, generate, read_prompts
from kdengine.store import verify_store
from kdengine.teachers import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True)
    ap.add_argument("--exl2", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "prompts.jsonl"
    with open(args.data, encoding="utf-8") as src:
        data.write_text("".join(next(src) for _ in range(args.prompts)))
    lines = read_prompts(data)

    runs = {}
    for name, path, backend, opts in (("hf", args.hf, "hf", {"device": "cuda", "dtype": "fp16"}),
                                      ("exl2", args.exl2, "exl2", {"max_batch_size": args.batch_size})):
        teacher = load_teacher(path, backend=backend, **opts)
        prompts = [_encode_prompt(line, teacher.tokenizer, True, str(data)) for line in lines]
        out = []
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first:first + args.batch_size]
            out += decode_batch(teacher, batch, [None] * len(batch), sampling=Sampling(),
                                max_new_tokens=args.max_new_tokens, capture=TopKCapture(args.top_k))
        runs[name] = out
        del teacher

    same, first_diff, top1, overlap, steps = 0, [], 0, 0.0, 0
    for a, b in zip(runs["hf"], runs["exl2"]):
        same += a.tokens == b.tokens
        common = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))
        first_diff.append(common)
        for i in range(common):
            a_idx, b_idx = a.targets[0][i], b.targets[0][i]  # the top-k ids of step i (targets: idx, logp)
            steps += 1
            top1 += int(a_idx[0] == b_idx[0])
            overlap += len(set(a_idx.tolist()) & set(b_idx.tolist())) / args.top_k
    report = {"prompts": len(lines), "identical_responses": same, "median_first_divergence": float(np.median(first_diff)),
              "steps_compared": steps, "top1_agreement": top1 / max(steps, 1), "topk_overlap": overlap / max(steps, 1)}

    summary = generate(GenerateConfig(teacher=args.exl2, data=str(data), out=str(work / "store"), top_k=args.top_k,
                                      backend="exl2", chat=True, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, progress=False))
    report.update(exl2_generate_tokens_per_s=summary.tokens_per_second, exl2_store_ok=verify_store(work / "store").ok,
                  bytes_per_position=summary.bytes_per_position)
    print(json.dumps(report, indent=1))
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
