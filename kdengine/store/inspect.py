"""What `kdengine inspect` shows: a store's summary, and one sample's teacher targets."""
from __future__ import annotations

import math

from kdengine.store.format import MANIFEST
from kdengine.store.reader import TopKStore

SUMMARY_KEYS = ("samples", "tokens", "positions", "bytes", "bytes_per_position", "top_k", "vocab_size",
                "teacher", "tokenizer_fingerprint", "codec")


def store_summary(store: TopKStore) -> dict:
    """The summary with exactly SUMMARY_KEYS: bytes is the whole store on disk (shards + manifest),
    bytes_per_position the compressed top-k payload bytes per target position."""
    payload = sum(s["payload_bytes"] for s in store.manifest["shards"])
    total = sum(s["bytes"] for s in store.manifest["shards"]) + (store.path / MANIFEST).stat().st_size
    return {
        "samples": len(store),
        "tokens": store.num_tokens,
        "positions": store.num_positions,
        "bytes": total,
        "bytes_per_position": round(payload / store.num_positions, 3) if store.num_positions else None,
        "top_k": store.k,
        "vocab_size": store.vocab_size,
        "teacher": store.teacher,
        "tokenizer_fingerprint": store.tokenizer_fingerprint,
        "codec": {"name": store.codec, "params": store.codec_params},
    }


def format_summary(store: TopKStore, summary: dict) -> str:
    codec = summary["codec"]
    params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in codec["params"].items())
    lines = [f"{key:>22}: {summary[key]}" for key in SUMMARY_KEYS if key != "codec"]
    lines.append(f"{'codec':>22}: {codec['name']}({params})")
    lines.append(f"{'shards':>22}: {store.num_shards}")
    if not store.complete:
        lines.append(f"{'status':>22}: INCOMPLETE - the dump has not finished; re-run the same "
                     f"`kdengine dump` command to complete it")
    return "\n".join(lines)


def format_sample(sample: dict, *, tokenizer=None, top: int = 5) -> str:
    """One line per target position: the actual next token, then the teacher's `top` entries with
    their probabilities and the tail mass. Token text needs `tokenizer`; without it ids are shown."""
    def show(token_id: int) -> str:
        if tokenizer is None:
            return f"#{token_id}"
        return repr(tokenizer.decode([token_id]))

    ids = sample["input_ids"].tolist()
    lines = [f"sample id={sample['id']!r} corpus index={sample['index']}: {len(ids)} tokens, "
             f"{len(sample['positions'])} target positions"]
    for row, t in enumerate(sample["positions"].tolist()):
        logp = sample["topk_logp"][row]
        tail = max(0.0, 1.0 - float(logp.exp().sum()))
        entries = "  ".join(f"{show(int(i))} {math.exp(float(lp)):.3f}"
                            for i, lp in zip(sample["topk_idx"][row][:top].tolist(), logp[:top].tolist()))
        lines.append(f"t={t:<5} next={show(ids[t + 1]):<14} | {entries}  | tail {tail:.3f}")
    return "\n".join(lines)
