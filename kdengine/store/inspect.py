"""What `kdengine inspect` shows: a store's summary (its true size, where the bytes go, how much mass
K keeps), and one sample's teacher targets."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from kdengine.store.format import SECTION_PREFIX
from kdengine.store.reader import TopKStore

SUMMARY_KEYS = ("targets", "samples", "tokens", "positions", "bytes", "bytes_per_position",
                "payload_bytes_per_position", "split", "split_per_position", "top_k", "top_p", "format_version",
                "vocab_size", "teacher", "tokenizer_fingerprint", "codec", "entries_per_position", "tail_mass",
                "entries_for_mass")
# Only in the summary of a sampled-target store (targets "sample").
SAMPLED_KEYS = ("draws_per_position", "proposal_temperature", "exact_top", "distinct_ids_per_position")
SPLIT_KEYS = ("payload_ids", "payload_values", "payload", "tokens", "positions", "tables", "index", "sections",
              "headers", "manifest")
MASSES = (0.9, 0.99, 0.999)
QUANTILES = (0.5, 0.9, 0.99)
_FRAME_HEADER_BYTES = 12
_TENSOR_PART = {"input_ids": "tokens", "input_ids.zst": "tokens", "positions": "positions",
                "position_gaps.zst": "positions", "payload": "payload", "id_prior": "tables",
                "id_count_codes.zst": "tables",
                "vocab_order": "tables", "vocab_order.zst": "tables", "token_offsets": "index",
                "position_offsets": "index", "frame_offsets": "index", "sample_index": "index", "sample_crc32": "index"}


def store_summary(store: TopKStore, *, stats_positions: int = 20000) -> dict:
    """The summary with exactly SUMMARY_KEYS (plus SAMPLED_KEYS for a sampled-target store).

    bytes is every file in the store directory (shards, manifest, parts); bytes_per_position =
    bytes / target positions, the one definition of the store's size used everywhere;
    payload_bytes_per_position the codec frames alone. split: where the bytes go (SPLIT_KEYS; they
    sum to bytes; payload_ids/payload_values are the writer's estimate from the coder's symbol costs,
    null where the codec gives none, and `payload` is their sum plus nothing else: the frames' bodies).
    tail_mass, entries_for_mass and entries_per_position are measured on up to `stats_positions`
    positions of evenly spaced samples (top-k stores; None for sampled targets).
    """
    positions = store.num_positions
    split = _split(store)
    total = sum(v for k, v in split.items() if k not in ("payload_ids", "payload_values") and v is not None)
    payload = sum(s["payload_bytes"] for s in store.manifest["shards"])
    per = (lambda b: None if b is None or not positions else round(b / positions, 3))
    tail, needed, width = _mass_stats(store, stats_positions)
    summary = {
        "targets": store.targets,
        "samples": len(store),
        "tokens": store.num_tokens,
        "positions": positions,
        "bytes": total,
        "bytes_per_position": per(total),
        "payload_bytes_per_position": per(payload),
        "split": split,
        "split_per_position": {k: per(v) for k, v in split.items()},
        "top_k": store.k,
        "top_p": store.top_p,
        "format_version": store.version,
        "vocab_size": store.vocab_size,
        "teacher": store.teacher,
        "tokenizer_fingerprint": store.tokenizer_fingerprint,
        "codec": {"name": store.codec, "params": store.codec_params},
        "entries_per_position": width,
        "tail_mass": tail,
        "entries_for_mass": needed,
    }
    if store.targets == "sample":
        distinct = sum(s["distinct_ids"] for s in store.manifest["shards"])
        summary.update({
            "draws_per_position": store.codec_params["samples"],
            "proposal_temperature": store.codec_params["proposal_temperature"],
            "exact_top": store.codec_params.get("exact_top", 0),
            "distinct_ids_per_position": round(distinct / store.num_positions, 3) if store.num_positions else None,
        })
    return summary


def _split(store: TopKStore) -> dict:
    split = dict.fromkeys(SPLIT_KEYS, 0)
    ids_known = True
    for entry in store.manifest["shards"]:
        path = store.path / entry["file"]
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        split["headers"] += 8 + n + _FRAME_HEADER_BYTES * entry["samples"]
        counted = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            part = "sections" if name.startswith(SECTION_PREFIX) else _TENSOR_PART.get(name, "index")
            split[part] += end - start
            counted += end - start
        split["headers"] += size - counted  # alignment padding, if any
        split["payload"] -= _FRAME_HEADER_BYTES * entry["samples"]
        body = entry["payload_bytes"] - _FRAME_HEADER_BYTES * entry["samples"]
        if "payload_id_bytes" in entry:
            split["payload_ids"] += min(entry["payload_id_bytes"], body)
            split["payload_values"] += body - min(entry["payload_id_bytes"], body)
        else:
            ids_known = False
    listed = {e["file"] for e in store.manifest["shards"]}
    split["manifest"] = sum(p.stat().st_size for p in Path(store.path).rglob("*")
                            if p.is_file() and p.name not in listed)
    if not ids_known:
        split["payload_ids"] = split["payload_values"] = None
    return split


def _mass_stats(store: TopKStore, budget: int):
    """(tail mass quantiles, entries needed for each of MASSES, entries kept per position) on up to
    `budget` positions from evenly spaced samples."""
    if store.targets != "topk" or not len(store) or not store.num_positions:
        return None, None, None
    per_sample = max(1.0, store.num_positions / len(store))
    n = min(len(store), max(1, math.ceil(budget / per_sample)))
    probs = []
    for i in np.unique(np.linspace(0, len(store) - 1, n).round().astype(int)):
        s = store[int(i)]
        probs.append(np.exp(s["topk_logp"].double().numpy()))
    width = max(p.shape[1] for p in probs)
    p = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in probs])
    if not p.shape[0]:
        return None, None, None
    mass = np.cumsum(p, axis=1)
    tail = np.maximum(0.0, 1.0 - mass[:, -1])
    tail_stats = {"positions": int(p.shape[0]), "mean": float(tail.mean()), "max": float(tail.max()),
                  **{f"p{round(q * 100)}": float(np.quantile(tail, q)) for q in QUANTILES}}
    needed = {}
    for m in MASSES:
        reached = mass[:, -1] >= m
        count = np.where(reached, 1 + (mass < m).sum(axis=1), np.inf)
        stats = {f"p{round(q * 100)}": _int_or_none(np.quantile(count, q, method="higher")) for q in QUANTILES}
        needed[str(m)] = {**stats, "not_reached": float(1.0 - reached.mean())}
    kept = (p > 0).sum(axis=1)
    width_stats = {"mean": float(kept.mean()), "max": int(kept.max()),
                   **{f"p{round(q * 100)}": int(np.quantile(kept, q, method="higher")) for q in QUANTILES}}
    return tail_stats, needed, width_stats


def _int_or_none(v):
    return None if not np.isfinite(v) else int(v)


def format_summary(store: TopKStore, summary: dict) -> str:
    s = summary
    codec = s["codec"]
    params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in codec["params"].items())
    lines = [f"{key:>22}: {s[key]}" for key in ("samples", "tokens", "positions")]
    lines.append(f"{'bytes':>22}: {s['bytes']:,} (every file in the store)")
    lines.append(f"{'bytes/position':>22}: {s['bytes_per_position']} (payload alone {s['payload_bytes_per_position']})")
    parts = [f"{k} {v}" for k, v in s["split_per_position"].items() if v is not None and k != "payload" or
             (k == "payload" and s["split"]["payload_ids"] is None)]
    lines.append(f"{'split (B/position)':>22}: " + ", ".join(parts))
    if s["split"]["payload_ids"] is not None:
        lines.append(f"{'':>22}  (payload ids/values: the writer's estimate from the coder's symbol costs)")
    k_text = f"{s['top_k']}" + (f" (cap), adaptive: top_p={s['top_p']}" if s["top_p"] is not None else "")
    lines.append(f"{'top_k':>22}: {k_text}")
    for key in ("targets", "format_version", "vocab_size", "teacher", "tokenizer_fingerprint"):
        lines.append(f"{key:>22}: {s[key]}")
    for key in SAMPLED_KEYS:
        if key in s:
            lines.append(f"{key:>22}: {s[key]}")
    lines.append(f"{'codec':>22}: {codec['name']}({params})")
    lines.append(f"{'shards':>22}: {store.num_shards}")
    if s["tail_mass"]:
        t = s["tail_mass"]
        lines.append(f"{'tail mass':>22}: mean {t['mean']:.4f}, p50 {t['p50']:.4f}, p90 {t['p90']:.4f}, "
                     f"p99 {t['p99']:.4f}, max {t['max']:.4f} (over {t['positions']} positions)")
        w = s["entries_per_position"]
        lines.append(f"{'entries kept':>22}: mean {w['mean']:.1f}, p50 {w['p50']}, p90 {w['p90']}, p99 {w['p99']}, "
                     f"max {w['max']}")
        for m, q in s["entries_for_mass"].items():
            show = lambda v: f">{s['top_k']}" if v is None else str(v)  # noqa: E731
            lines.append(f"{'entries for ' + str(float(m) * 100).rstrip('0').rstrip('.') + '%':>22}: p50 "
                         f"{show(q['p50'])}, p90 {show(q['p90'])}, p99 {show(q['p99'])} "
                         f"(not reached within the stored entries: {q['not_reached']:.1%})")
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
                            for i, lp in zip(sample["topk_idx"][row][:top].tolist(), logp[:top].tolist()) if i >= 0)
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
