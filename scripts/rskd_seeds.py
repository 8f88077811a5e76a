#!/usr/bin/env python
"""scripts/rskd_quality.py's tables for several seeds, side by side: does a difference hold across training seeds?

Each input is the .json that rskd_quality.py writes next to its table, one per --seed (the same other
arguments). Per arm and seed: held-out KL to the teacher and ECE, each with its difference from
top-64 + tail and that difference's 95% paired-bootstrap interval (which covers the held-out sample
only); the last columns say on how many seeds the interval lies wholly above or below zero. A second
table takes each arm's per-seed differences as paired samples: their mean and 95% t interval over
seeds, the interval that covers training randomness.

    python scripts/rskd_seeds.py [--plot scripts/results/rskd_quality_seeds.png] \
        scripts/results/rskd_quality_120steps_eval96.json \
        scripts/results/rskd_quality_120steps_eval96_seed1.json > scripts/results/rskd_quality_seeds.md

--plot also draws both as a forest plot (per seed and across seeds, per metric).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdengine.evals.distill import t_interval  # noqa: E402

BASELINE = "top-64 + tail"
METRICS = (("kl_to_teacher", "KL"), ("ece_to_teacher", "ECE"))
# Arguments that may differ between the inputs: the seed, where a run wrote, and which arms it had
# (only the arms every input has are compared).
PER_RUN = ("seed", "out", "results", "tag", "samples", "exact_head")


def _verdict(intervals: list) -> str:
    above = sum(lo > 0 for _, lo, _ in intervals)
    below = sum(hi < 0 for _, _, hi in intervals)
    return f"{above} higher, {below} lower, {len(intervals) - above - below} tie"


def _common_arms(results: list[dict]) -> list[str]:
    """The arms (teacher excluded) that every input scored, in the first input's order."""
    return [name for name in results[0]["scores"] if name != "teacher" and all(name in r["scores"] for r in results)]


def render(results: list[dict], paths: list[str], command: str | None = None) -> str:
    """The two tables; `command` (default: the script on `paths`) is the line the header quotes."""
    seeds = [r["args"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"every input must come from another --seed, got seeds {seeds}")
    fixed = {k: v for k, v in results[0]["args"].items() if k not in PER_RUN}
    for path, r in zip(paths, results):
        other = {k: v for k, v in r["args"].items() if k not in PER_RUN}
        if other != fixed:
            sys.exit(f"{path} was run with other arguments than {paths[0]}: {other} vs {fixed}")
    arms = _common_arms(results)
    only_some = sorted({name for r in results for name in r["scores"]} - set(arms) - {"teacher"})
    lines = [
        "# RS-KD quality across training seeds (scripts/rskd_seeds.py)",
        "",
        "`" + (command or "python scripts/rskd_seeds.py " + " ".join(paths)) + "`",
        "",
        f"Seeds {', '.join(map(str, seeds))}; otherwise the same run: {results[0]['args']['steps']} steps, "
        f"{results[0]['args']['eval_problems']} held-out problems ({results[0]['scores']['teacher']['positions']} "
        "positions). A seed changes the student's training order and, for sampled stores, the draws. "
        f"Δ: the arm minus {BASELINE} on the same seed, [95% paired-bootstrap interval over held-out problems]. "
        "The verdict columns count the seeds whose interval lies wholly above zero (higher), below it (lower), "
        "or covers it (tie)."
        + (f" Arms not in every input, left out: {', '.join(only_some)}." if only_some else ""),
        "",
        "| targets | B/position | " + " | ".join(f"{label} seed {s} (Δ [95%])" for _, label in METRICS for s in seeds)
        + " | " + " | ".join(f"{label} verdict" for _, label in METRICS) + " |",
        "|---|---:|" + "---:|" * (len(METRICS) * len(seeds)) + "---|" * len(METRICS),
    ]
    for arm in arms:
        stores = [r["stores"].get(arm) for r in results]
        size = ", ".join(f"{s['bytes'] / s['positions']:.1f}" for s in stores) if all(stores) else "(no store)"
        cells, verdicts = [], []
        for metric, _ in METRICS:
            intervals = []
            for r in results:
                score = r["scores"][arm]
                delta = score.get("vs_" + BASELINE, {}).get(metric)
                cell = f"{score[metric]:.4f}"
                if delta:
                    intervals.append(delta)
                    cell += f" ({delta[0]:+.4f} [{delta[1]:+.4f}, {delta[2]:+.4f}])"
                cells.append(cell)
            verdicts.append(_verdict(intervals) if intervals else "baseline")
        lines.append(f"| {arm} | {size} | " + " | ".join(cells) + " | " + " | ".join(verdicts) + " |")
    lines += ["", f"Across seeds: the mean over {len(seeds)} seeds of each seed's Δ against {BASELINE}, "
              f"[95% t interval over seeds, {len(seeds) - 1} degrees of freedom]; below zero is better.", "",
              "| targets | " + " | ".join(f"{label} mean Δ [95%]" for _, label in METRICS) + " |",
              "|---|" + "---:|" * len(METRICS)]
    for arm in arms:
        deltas = [[r["scores"][arm].get("vs_" + BASELINE, {}).get(metric) for r in results] for metric, _ in METRICS]
        if not all(all(d) for d in deltas):
            continue
        cells = []
        for per_seed in deltas:
            mean, half = t_interval([d[0] for d in per_seed])
            cells.append(f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict]):
    """A forest plot per metric: each arm's Δ against the baseline on every seed (held-out bootstrap
    interval) and, below them, the mean over seeds with its t interval; the dashed line is no difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [name for name in _common_arms(results) if name != BASELINE]
    seeds = [r["args"]["seed"] for r in results]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(7 * len(METRICS), 0.9 + 0.35 * len(arms) * (len(seeds) + 2)),
                             squeeze=False)
    for ax, (metric, label) in zip(axes[0], METRICS):
        ticks, names = [], []
        y = 0.0
        for arm in arms:
            deltas = [r["scores"][arm]["vs_" + BASELINE][metric] for r in results]
            for seed, (d, lo, hi) in zip(seeds, deltas):
                ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o", color="tab:blue", ms=4, capsize=2)
                ticks.append(y)
                names.append(f"{arm}, seed {seed}")
                y += 1
            mean, half = t_interval([d for d, _, _ in deltas])
            ax.errorbar(mean, y, xerr=half, fmt="D", color="black", ms=5, capsize=3)
            ticks.append(y)
            names.append(f"{arm}, mean over seeds")
            y += 2
        ax.axvline(0, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(ticks, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"Δ {label} vs {BASELINE} (lower is better)")
        ax.set_title(f"held-out {label}: dots per seed (95% bootstrap over problems),\n"
                     "diamonds the mean over seeds (95% t interval over seeds)", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", type=Path, help="also write the forest plot to this .png")
    ap.add_argument("results", nargs="+", help="rskd_quality.py .json files, one per seed (at least two)")
    args = ap.parse_args()
    if len(args.results) < 2:
        ap.error("give at least two seeds' .json files")
    results = [json.loads(Path(p).read_text()) for p in args.results]
    print(render(results, args.results, "python scripts/rskd_seeds.py " + " ".join(sys.argv[1:])), end="")
    if args.plot is not None:
        plot(results).savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
