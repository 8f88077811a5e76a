"""The demo's report: OUT/summary.json (the numbers), summary.md (tables) and summary.png (plots)."""
from __future__ import annotations

import json
from pathlib import Path

from kdengine.durable import write_atomic

LABELS = {"teacher": "teacher", "student_before": "student before", "student_ce": "CE student",
          "student_after": "KD student"}
COLORS = {"teacher": "#4c72b0", "student_before": "#c44e52", "student_ce": "#dd8452", "student_after": "#55a868"}


def write_summary(out: Path, summary: dict, train_metrics: dict[str, list[dict]]) -> None:
    """Writes summary.json, summary.md and summary.png into `out`.

    Args:
        out: the demo's output directory.
        summary: `run_demo`'s summary ({"models", "stages", "run"}).
        train_metrics: {role: that training run's metrics.jsonl records (step, loss, kd, ce, ...)} for
            the trained students, for the loss curves.
    """
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    write_atomic(out / "summary.md", summary_markdown(summary).encode("utf-8"))
    _plot(out / "summary.png", summary, train_metrics)


def summary_markdown(summary: dict) -> str:
    """The summary as a page: what ran, the model table, the stage table, where the reports are."""
    models, stages, run = summary["models"], summary["stages"], summary["run"]
    student, train, dump, gsm8k = stages["student"], stages["train"], stages["dump"], stages["gsm8k"]
    layers = ",".join(map(str, student["teacher_layers"]))
    n = gsm8k["problems"]
    baseline = ("A CE student, the same student trained on the same problems, steps and batches with plain "
                "cross-entropy on the worked answers (no teacher), is the baseline. "
                if "student_ce" in models else "")
    lines = [
        "# kdengine demo: a teacher distilled into a smaller student",
        "",
        f"Teacher `{stages['teacher']['source']}`. Student: {student['layers']} of its layers ({layers}), "
        f"trained for {train['steps']} steps of sparse top-{dump['top_k']} KL (the KD student) on the teacher's "
        f"store of {dump['samples']} generated word problems; scored on {n} held-out problems. {baseline}"
        f"Device {run['device']}, {run['threads']} threads; total wall time {_duration(run['total_wall_s'])} "
        f"(1-minute load average {_load(run['load_average_start'])} at the start, "
        f"{_load(run['load_average_end'])} at the end).",
        "",
        "| | " + " | ".join(LABELS[role] for role in models) + " |",
        "|---|" + "---:|" * len(models),
        _row(f"GSM8K accuracy ({n} held-out, chat, greedy, cascade {gsm8k['cascade']})", models,
             lambda m: f"{m['gsm8k_accuracy']:.1%} ({m['gsm8k_correct']}/{m['gsm8k_n']})"),
        _row("KL to teacher (nats/position, full vocabulary)", models,
             lambda m: f"{m['kl_to_teacher']:.4f}", teacher="0 ¹"),
        _row("top-1 agreement with the teacher", models, lambda m: f"{m['top1_agreement']:.3f}", teacher="1 ¹"),
        _row("perplexity of the held-out worked answers", models, lambda m: _number(m["perplexity"])),
        _row("parameters", models, lambda m: f"{m['params'] / 1e6:.1f}M"),
        _row("GSM8K generation tokens/s", models, lambda m: f"{m['generation_tokens_per_s']:.1f}"),
        "",
        f"¹ By definition: the teacher is the reference distribution. KL, agreement and perplexity are "
        f"teacher-forced on the {models['teacher']['heldout_positions']} answer tokens of the held-out "
        "problems, over the full vocabulary, against the teacher run directly (not the top-k store).",
        "",
        "| stage | wall time | tokens/s | what it did |",
        "|---|---:|---:|---|",
    ]
    for name, record in stages.items():
        rate = record.get("tokens_per_s")
        lines.append(f"| {name} | {_duration(record['wall_s'])} | {'' if rate is None else f'{rate:,.0f}'} | "
                     f"{_stage_note(name, record)} |")
    lines += [f"| total | {_duration(run['total_wall_s'])} | | |", ""]
    if "student_ce" in models:
        lines += [_verdict(models), ""]
    lines += [
              f"Store: {dump['bytes_per_position']:.1f} bytes/position on disk, every file counted (top-{dump['top_k']}, codec "
              f"{dump['codec']}; {dump['bytes']:,} bytes for {dump['positions']:,} positions).", "",
              "GSM8K reports: " + ", ".join(f"{LABELS[role]} `{path}`" for role, path in gsm8k["reports"].items())
              + ".", ""]
    return "\n".join(lines)


def _verdict(models: dict) -> str:
    kd, ce = models["student_after"], models["student_ce"]
    kl = "beats" if kd["kl_to_teacher"] < ce["kl_to_teacher"] else "does not beat"
    top1 = "beats" if kd["top1_agreement"] > ce["top1_agreement"] else "does not beat"
    return (f"KD vs CE on the held-out answers: the KD student {kl} the CE student on KL to the teacher "
            f"({kd['kl_to_teacher']:.4f} vs {ce['kl_to_teacher']:.4f}) and {top1} it on top-1 agreement "
            f"({kd['top1_agreement']:.3f} vs {ce['top1_agreement']:.3f}); perplexity "
            f"{_number(kd['perplexity'])} vs {_number(ce['perplexity'])}; GSM8K {kd['gsm8k_correct']} vs "
            f"{ce['gsm8k_correct']} of {kd['gsm8k_n']}.")


def _stage_note(name: str, r: dict) -> str:
    if name == "teacher":
        return f"converted to `{r['directory']}`" if r["converted_now"] else f"loaded from `{r['directory']}`"
    if name == "data":
        return f"{r['train_problems']} train + {r['heldout_problems']} held-out problems, seed {r['seed']}"
    if name == "dump":
        return (f"{r['samples']} samples, {r['tokens']:,} tokens, {r['positions']:,} target positions, "
                f"{r['bytes_per_position']:.1f} bytes/position")
    if name == "student":
        return f"decoder layers copied from teacher layers {','.join(map(str, r['teacher_layers']))}"
    if name in ("train", "train_ce"):
        kind = "sparse KL" if name == "train" else "cross-entropy" + (
            ", the same batches as train" if r["same_batches_as_kd"] else ", NOT the same batches as train")
        return (f"{r['steps']} steps x {r['batch_tokens']} batch tokens, {kind}, lr {r['lr']:g}; "
                f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}; held-out store KD {r['store_heldout_kd']:.3f}")
    if name == "gsm8k":
        return (f"{r['models']} models x {r['problems']} problems, batch {r['batch_size']}, at most {r['max_new_tokens']} "
                f"new tokens; {r['new_tokens']:,} generated (tokens/s: generated)")
    if name == "heldout":
        return (f"{r['samples']} samples, {r['tokens']:,} tokens, {r['positions']:,} scored positions "
                f"(tokens/s: held-out tokens, each through all {r['models']} models)")
    return ""


def _row(label: str, models: dict, cell, teacher: str | None = None) -> str:
    cells = [teacher if role == "teacher" and teacher is not None else cell(m) for role, m in models.items()]
    return f"| {label} | " + " | ".join(cells) + " |"


def _number(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _load(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _plot(path: Path, summary: dict, train_metrics: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, stages = summary["models"], summary["stages"]
    roles = list(models)
    labels = [LABELS[r] for r in roles]
    colors = [COLORS[r] for r in roles]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle(f"kdengine demo: {stages['student']['layers']}-layer student distilled from the teacher "
                 f"({stages['dump']['samples']} train problems, {stages['gsm8k']['problems']} held out)",
                 fontsize=13)

    ax = axes[0, 0]
    for role, metrics in train_metrics.items():
        steps = [m["step"] for m in metrics]
        ax.plot(steps, [m["kd"] for m in metrics], color=COLORS[role], marker="o", markersize=3,
                label=f"{LABELS[role]}: KL to the store")
        ax.plot(steps, [m["ce"] for m in metrics], color=COLORS[role], linestyle="--",
                label=f"{LABELS[role]}: CE on the answers")
    ax.set(title="training (KD student trains on the KL, CE student on the CE)", xlabel="step",
           ylabel="nats / target position", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    _bars(axes[0, 1], labels, [100 * models[r]["gsm8k_accuracy"] for r in roles], colors,
          "GSM8K accuracy, held out (%)", [f"{models[r]['gsm8k_correct']}/{models[r]['gsm8k_n']}" for r in roles])
    _bars(axes[0, 2], labels, [models[r]["kl_to_teacher"] for r in roles], colors,
          "KL to teacher (nats/position; lower is better)",
          ["0 (ref.)"] + [f"{models[r]['kl_to_teacher']:.3f}" for r in roles[1:]])
    _bars(axes[1, 0], labels, [models[r]["top1_agreement"] for r in roles], colors,
          "top-1 agreement with the teacher", ["1 (ref.)"] + [f"{models[r]['top1_agreement']:.3f}" for r in roles[1:]])
    _bars(axes[1, 1], labels, [models[r]["perplexity"] for r in roles], colors,
          "perplexity of held-out answers (log scale)", [_number(models[r]["perplexity"]) for r in roles], log=True)

    ax = axes[1, 2]
    names = list(stages)[::-1]
    walls = [stages[n]["wall_s"] for n in names]
    ax.barh(names, walls, color="#8172b2")
    for y, w in enumerate(walls):
        ax.text(w, y, f" {_duration(w)}", va="center", fontsize=9)
    ax.set(title=f"wall time per stage (total {_duration(summary['run']['total_wall_s'])})", xlabel="seconds")
    ax.set_xlim(0, max(walls) * 1.3 if max(walls) > 0 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax, labels, values, colors, title, texts, log=False):
    bars = ax.bar(labels, values, color=colors)
    if log:
        ax.set_yscale("log")
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=10, xytext=(0, 2), textcoords="offset points")
    top = max(values) if max(values) > 0 else 1
    if not log:
        ax.set_ylim(0, top * 1.18)
    else:
        ax.set_ylim(min(v for v in values if v > 0) / 2, top * 5)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
