"""`kdengine bench`'s report.md (the table, the machine, break-even) and report.png (bars per model)."""
from __future__ import annotations

from pathlib import Path


def report_markdown(report: dict) -> str:
    models, settings, machine = report["models"], report["settings"], report["machine"]
    load = machine["load_average_start"], machine["load_average_end"]
    lines = [
        "# kdengine bench",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}; 1/5/15-minute load "
        f"average {_loads(load[0])} at the start, {_loads(load[1])} at the end (a busy machine inflates every "
        "time below). Greedy decoding, at most "
        f"{settings['max_new_tokens']} new tokens; latency at batch 1 over {models[0]['latency_queries']} queries, "
        f"throughput and energy over {settings['queries']} queries at batch {settings['batch_size']}.",
        "",
        "| model | params | on disk | load | latency p50 / p95 (batch 1) | generated tok/s | prompt tok/s | "
        "peak memory | energy per 1k queries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        lines.append(
            f"| `{m['model']}` | {m['params'] / 1e6:.1f}M | {m['size_on_disk_mb']:.0f} MB | {m['load_s']:.1f} s | "
            f"{m['latency_p50_s']:.2f} / {m['latency_p95_s']:.2f} s | {m['tokens_per_s']:.1f} | "
            f"{m['prompt_tokens_per_s']:.0f} | {m['peak_memory_mb']:.0f} MB ({m['peak_memory_kind']}) | "
            f"{m['energy_j_per_1k_queries'] / 1000:.2f} kJ ({m['energy_source']}) |")
    lines += ["", "Energy: " + "; ".join(f"`{m['model']}`: {m['energy_note']}" for m in models) + ".", ""]
    if len(models) > 1:
        base = models[0]
        lines += ["Against the first model: " + "; ".join(
            f"`{m['model']}` {base['latency_p50_s'] / m['latency_p50_s']:.2f}x lower latency, "
            f"{m['tokens_per_s'] / base['tokens_per_s']:.2f}x the throughput, "
            f"{base['energy_j_per_1k_queries'] / m['energy_j_per_1k_queries']:.2f}x less energy per query"
            for m in models[1:]) + ".", ""]
    be = report.get("break_even")
    if be:
        cost = be["inputs"]["distill"]
        lines += ["## Break-even", "",
                  f"Distillation cost, from {', '.join('`' + r['dir'] + '`' for r in cost['runs'])}: "
                  f"{cost['wall_s'] / 60:.1f} min wall time, {cost['energy_j'] / 1000:.1f} kJ "
                  f"({cost['energy_source']}: wall time x busy cores x {cost['cpu_watts']:g} W). "
                  f"Per query the teacher `{be['teacher']}` spends "
                  f"{be['inputs']['teacher_energy_j_per_1k_queries']:.0f} J per 1k queries and "
                  f"{be['inputs']['teacher_latency_p50_s']:.2f} s at batch 1.", "",
                  "| student | energy saved per query | latency saved per query | queries to break even (energy) | "
                  "queries to break even (time) |", "|---|---:|---:|---:|---:|"]
        for s in be["students"]:
            lines.append(f"| `{s['model']}` | {s['energy_saved_j_per_query']:.2f} J | "
                         f"{s['latency_saved_s_per_query']:.3f} s | {_queries(s['queries_to_break_even_energy'])} | "
                         f"{_queries(s['queries_to_break_even_time'])} |")
        lines.append("")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    names = [Path(m["model"]).name or m["model"] for m in models]
    panels = [("latency p50 at batch 1 (s)", "latency_p50_s"), ("generated tokens/s", "tokens_per_s"),
              ("peak memory (MB)", "peak_memory_mb"), ("energy per 1k queries (kJ)", "energy_j_per_1k_queries")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (title, key) in zip(axes, panels):
        values = [m[key] / (1000 if key.startswith("energy") else 1) for m in models]
        bars = ax.bar(names, values, color=["#4c72b0", "#55a868", "#dd8452", "#c44e52", "#8172b2"][:len(models)])
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=9)
        if key.startswith("energy"):
            title += " (" + "/".join(sorted({m["energy_source"] for m in models})) + ")"
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _queries(n: float | None) -> str:
    return "never" if n is None else f"{n:,.0f}"


def _loads(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)
