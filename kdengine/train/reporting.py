"""Where training metrics go besides metrics.jsonl / eval.jsonl: TensorBoard and Weights & Biases
(`--report-to`), and OUT/curves.png drawn from the two JSONL files at the end of every run.

Every numeric field of every record goes to every sink, under `train/<field>` or `eval/<field>`, at the
record's step.
"""
from __future__ import annotations

from pathlib import Path

from kdengine.train.errors import TrainError


class TensorBoardSink:
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, kind: str, record: dict) -> None:
        for key, value in _scalars(record):
            self._writer.add_scalar(f"{kind}/{key}", value, global_step=record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A W&B run in OUT/wandb/ (offline with WANDB_MODE=offline; sync later with `wandb sync`)."""

    def __init__(self, out: Path, config: dict, resume: bool):
        try:
            import wandb
        except ImportError:
            raise TrainError("--report-to wandb needs the wandb package: pip install 'kdengine[wandb]'") from None
        self._run = wandb.init(dir=str(out), project="kdengine", name=out.name, config=config,
                               resume="allow" if resume else None, id=_run_id(out, resume))

    def log(self, kind: str, record: dict) -> None:
        self._run.log({f"{kind}/{key}": value for key, value in _scalars(record)}, step=record["step"])

    def close(self) -> None:
        self._run.finish()


def open_sinks(report_to: list[str], out: Path, config: dict, *, resume: bool) -> list:
    sinks = []
    if "tensorboard" in report_to:
        sinks.append(TensorBoardSink(out))
    if "wandb" in report_to:
        sinks.append(WandbSink(out, config, resume))
    return sinks


def _scalars(record: dict):
    return [(k, float(v)) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]


def _run_id(out: Path, resume: bool) -> str:
    """One W&B run id per run directory, kept in OUT/wandb/run_id so a --resume continues that run."""
    import secrets

    path = out / "wandb" / "run_id"
    if resume and path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def plot_curves(out: Path) -> Path:
    """OUT/curves.png from OUT/metrics.jsonl and OUT/eval.jsonl: loss with its KD and CE parts, held-out
    KD and top-1 agreement, learning rate, tokens/s, over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdengine.durable import write_atomic

    train = _read(out / "metrics.jsonl")
    evals = _read(out / "eval.jsonl")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    steps = [r["step"] for r in train]
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in train], label="loss")
    ax.plot(steps, [r["kd"] for r in train], label="KD part", alpha=0.7)
    ax.plot(steps, [r["ce"] for r in train], label="CE part", alpha=0.7)
    ax.set_title("training loss")
    ax.legend()
    _panel(axes[0, 1], [r["step"] for r in evals], [r["eval_kd"] for r in evals], "held-out KD to the teacher", "o-")
    _panel(axes[0, 2], [r["step"] for r in evals], [r["eval_top1"] for r in evals], "held-out top-1 agreement", "o-")
    _panel(axes[1, 0], steps, [r["lr"] for r in train], "learning rate")
    _panel(axes[1, 1], steps, [r["tokens_per_s"] for r in train], "tokens/s (per log window)")
    _panel(axes[1, 2], steps, [r["grad_norm"] for r in train], "gradient norm (before clipping)")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"kdengine train: {out}")
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    path = out / "curves.png"
    write_atomic(path, buffer.getvalue())
    return path


def _panel(ax, x, y, title, style="-"):
    ax.plot(x, y, style)
    ax.set_title(title)


def _read(path: Path) -> list[dict]:
    from kdengine.jsonl import read_jsonl

    return [r for _, r in read_jsonl(path) if isinstance(r, dict)] if path.is_file() else []
