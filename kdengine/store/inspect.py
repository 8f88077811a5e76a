"""What `kdengine inspect` shows: a store's summary, and one sample's teacher targets."""
from __future__ import annotations

import math

from kdengine.store.format import MANIFEST
from kdengine.store.reader import TopKStore

SUMMARY_KEYS = ("targets", "samples", "tokens", "positions", "bytes", "bytes_per_position", "top_k", "vocab_size",
                "teacher", "tokenizer_fingerprint", "codec")
# Only in the summary of a sampled-target store (targets "sample").
SAMPLED_KEYS = ("draws_per_position", "proposal_temperature", "distinct_ids_per_position")


def store_summary(store: TopKStore) -> dict:
    """The summary with exactly SUMMARY_KEYS (plus SAMPLED_KEYS for a sampled-target store): bytes is
    the whole store on disk (shards + manifest), bytes_per_position the compressed payload bytes per
    target position; `targets` is "topk" or "sample"."""
    payload = sum(s["payload_bytes"] for s in store.manifest["shards"])
    total = sum(s["bytes"] for s in store.manifest["shards"]) + (store.path / MANIFEST).stat().st_size
    summary = {
        "targets": store.targets,
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
    if store.targets == "sample":
        distinct = sum(s["distinct_ids"] for s in store.manifest["shards"])
        summary.update({
            "draws_per_position": store.codec_params["samples"],
            "proposal_temperature": store.codec_params["proposal_temperature"],
            "distinct_ids_per_position": round(distinct / store.num_positions, 3) if store.num_positions else None,
        })
    return summary


def format_summary(store: TopKStore, summary: dict) -> str:
    codec = summary["codec"]
    params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in codec["params"].items())
    lines = [f"{key:>26}: {summary[key]}" for key in SUMMARY_KEYS + SAMPLED_KEYS if key != "codec" and key in summary]
    lines.append(f"{'codec':>26}: {codec['name']}({params})")
    lines.append(f"{'shards':>26}: {store.num_shards}")
    if not store.complete:
        lines.append(f"{'status':>26}: INCOMPLETE - the dump has not finished; re-run the same "
                     f"`kdengine dump` command to complete it")
    return "\n".join(lines)


def format_sample(sample: dict, *, tokenizer=None, top: int = 5) -> str:
    """One line per target position: the actual next token, then the teacher's `top` entries with
    their probabilities and the tail mass. Token text needs `tokenizer`; without it ids are shown."""
    def show(token_id: int) -> str:
        if tokenizer is None:
            return f"#{token_id}"
        return repr(tokenizer.decode([token_id]))

    if "sample_idx" in sample:
        return _format_sampled(sample, show)
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


def _format_sampled(sample: dict, show) -> str:
    """A sampled-target sample: per position the drawn ids with their counts and teacher probabilities."""
    ids = sample["input_ids"].tolist()
    lines = [f"sample id={sample['id']!r} corpus index={sample['index']}: {len(ids)} tokens, "
             f"{len(sample['positions'])} target positions (sampled targets: id xcount p)"]
    for row, t in enumerate(sample["positions"].tolist()):
        drawn = sample["sample_count"][row] > 0
        entries = "  ".join(f"{show(int(i))} x{int(c)} {math.exp(float(lp)):.3f}" for i, c, lp in zip(
            sample["sample_idx"][row][drawn].tolist(), sample["sample_count"][row][drawn].tolist(),
            sample["sample_logp"][row][drawn].tolist()))
        lines.append(f"t={t:<5} next={show(ids[t + 1]):<14} | {entries}")
    return "\n".join(lines)
