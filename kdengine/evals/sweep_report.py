"""The sweep's tables (cells.csv, summary.csv, summary.md) and figures (metrics.png, gain.png, pareto.png)."""
from __future__ import annotations

from pathlib import Path

from kdengine.durable import write_atomic
from kdengine.evals.sweep import HIGHER_IS_BETTER, METRICS


def write_sweep_report(out: Path, rows: list[dict], summary: list[dict], cfg: dict) -> None:
    import pandas as pd

    write_atomic(out / "cells.csv", pd.DataFrame(rows).to_csv(index=False).encode())
    write_atomic(out / "summary.csv", pd.DataFrame(summary).to_csv(index=False).encode())
    write_atomic(out / "summary.md", sweep_markdown(rows, summary, cfg).encode())
    _plot_metrics(out / "metrics.png", summary)
    _plot_gain(out / "gain.png", summary)
    _plot_pareto(out / "pareto.png", rows)


def sweep_markdown(rows: list[dict], summary: list[dict], cfg: dict) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in summary))
    base = summary[0]["baseline"]
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# kdengine sweep", "",
             f"{len(settings)} settings x {len(seeds)} seeds ({', '.join(map(str, seeds))}) = {len(rows)} cells; "
             f"each a `kdengine train` run of student `{cfg['student']}` on store `{cfg['store']}` with "
             f"{', '.join(f'{k} {v}' for k, v in cfg['train'].items())}. Held-out metrics: full-vocabulary, "
             f"teacher-forced against `{cfg['teacher']}` on `{cfg['heldout']}`; GSM8K on the same problems. "
             f"Baseline: `{base}`.", "",
             "Mean ± 95% CI over seeds (t distribution); Δ = mean paired difference to the baseline (same seed), "
             "p from a paired t-test (scipy.stats.ttest_rel), d = Cohen's d_z (mean / sd of the paired "
             "differences).", ""]
    for metric in METRICS:
        arrow = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
        lines += [f"## {metric} ({arrow})", "", "| setting | mean ± 95% CI | Δ vs baseline | p | d |",
                  "|---|---:|---:|---:|---:|"]
        for r in (r for r in summary if r["metric"] == metric):
            if r["setting"] == base:
                extra = "baseline | | "
            else:
                extra = f"{r['diff']:+.4g} | {_fmt(r.get('p'))} | {_fmt(r.get('cohens_d'))}"
            lines.append(f"| `{r['setting']}` | {r['mean']:.4g} ± {_fmt(r['ci95'])} | {extra} |")
        lines.append("")
    lines += ["## Cells", "", "| cell | " + " | ".join(METRICS) + " | final loss | train s |",
              "|---|" + "---:|" * (len(METRICS) + 2)]
    for r in rows:
        lines.append(f"| `{r['cell']}` | " + " | ".join(f"{r[m]:.4g}" for m in METRICS)
                     + f" | {r['final_loss']:.4g} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:.3g}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_metrics(path: Path, summary: list[dict]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        rs = [r for r in summary if r["metric"] == metric]
        means, cis = [r["mean"] for r in rs], [_zero(r["ci95"]) for r in rs]
        log = metric == "perplexity" and all(m > 0 for m in means)  # spans orders of magnitude; > 0
        # on a log axis the lower bar stops short of 0 (a CI past 0 says only "as low as it can be")
        yerr = [[min(c, 0.9 * m) for m, c in zip(means, cis)], cis] if log else cis
        ax.bar(range(len(rs)), means, yerr=yerr, capsize=4,
               color=["#8c8c8c" if r["setting"] == r["baseline"] else "#4c72b0" for r in rs])
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(len(rs)), [r["setting"] for r in rs], rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{metric} (mean ± 95% CI{', log scale' if log else ''})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_gain(path: Path, summary: list[dict]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        rs = [r for r in summary if r["metric"] == metric and r["setting"] != r["baseline"]]
        sign = 1 if HIGHER_IS_BETTER[metric] else -1
        gains = [sign * r["diff"] for r in rs]
        ax.bar(range(len(rs)), gains, color=["#55a868" if g > 0 else "#c44e52" for g in gains])
        for x, r in enumerate(rs):
            ax.annotate(f"p={_fmt(r.get('p'))}\nd={_fmt(r.get('cohens_d'))}", (x, gains[x]), ha="center",
                        va="bottom" if gains[x] >= 0 else "top", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rs)), [r["setting"] for r in rs], rotation=20, ha="right", fontsize=8)
        base = summary[0]["baseline"]
        ax.set_title(f"gain in {metric} over {base}\n(positive = better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pareto(path: Path, rows: list[dict]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for setting in settings:
        rs = [r for r in rows if r["setting"] == setting]
        ax.scatter([r["seconds_per_token"] * 1000 for r in rs], [r["kl_to_teacher"] for r in rs], label=setting)
    points = sorted((r["seconds_per_token"] * 1000, r["kl_to_teacher"]) for r in rows)
    front, best = [], float("inf")
    for x, y in points:  # lower latency and lower KL are both better
        if y < best:
            front.append((x, y))
            best = y
    ax.plot(*zip(*front), color="black", linestyle="--", linewidth=1, label="Pareto front")
    params = sorted({r["params"] for r in rows})
    ax.set(xlabel="generation latency (ms per token, GSM8K run)", ylabel="KL to teacher (lower is better)",
           title=f"quality vs latency ({', '.join(f'{p / 1e6:.1f}M' for p in params)} params)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _zero(value) -> float:
    return 0.0 if value is None or value != value else value
