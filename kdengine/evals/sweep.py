"""`kdengine sweep --config sweep.yaml`: a grid of training settings x seeds, each cell an ordinary
`kdengine train` run, then held-out metrics and GSM8K accuracy per cell and statistics over seeds.

    student: demo-out/student          # the student every cell starts from
    store: demo-out/store              # the teacher's top-k store
    teacher: demo-out/teacher          # for the held-out full-vocabulary KL
    heldout: demo-out/data/heldout.jsonl   # GSM8K-format held-out problems
    out: sweeps/kd-vs-ce
    seeds: [0, 1, 2]
    grid:                              # every combination is a setting; method is required
      method: [ce, fkl, rkl]           # ce: --alpha 0; fkl/rkl/jsd: KD with --divergence (where the trainer has it)
      temperature: [1.0]               # any other key is a `kdengine train` flag: --temperature 1.0
    baseline: {method: ce}             # the setting the others are tested against (default: the first)
    train: {steps: 20, batch_tokens: 1024, lr: 5.0e-4}   # flags every cell gets
    gsm8k: {limit: 16, max_new_tokens: 64, batch_size: 16}

Resumable: a cell whose OUT/cells/<id>/result.json exists is skipped; a cell whose training was
killed resumes from its newest checkpoint (every cell runs with --resume and --save-every), and a
finished cell's checkpoints are removed. Results: OUT/cells.csv (one row per cell), OUT/summary.csv
and summary.md (mean, 95% CI over seeds from the t distribution, paired t-test by seed and Cohen's
d_z against the baseline: mean of the paired differences / their standard deviation), and figures
OUT/metrics.png (each metric vs setting with 95% CI error bars), OUT/gain.png (each setting's gain
over the baseline) and OUT/pareto.png (quality vs generation latency per token, Pareto front).
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kdengine.evals.gsm8k import EvalError

METRICS = ("kl_to_teacher", "top1_agreement", "perplexity", "gsm8k_accuracy")
HIGHER_IS_BETTER = {"kl_to_teacher": False, "top1_agreement": True, "perplexity": False, "gsm8k_accuracy": True}
KD_METHODS = ("fkl", "rkl", "jsd")
_REQUIRED = ("student", "store", "teacher", "heldout", "out", "seeds", "grid")


@dataclass(frozen=True)
class Cell:
    setting: dict  # the grid values, method included
    seed: int

    @property
    def setting_id(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.setting.items())

    @property
    def ident(self) -> str:
        return re.sub(r"[^A-Za-z0-9.=,_-]+", "-", f"{self.setting_id},seed={self.seed}")


def load_config(path: str | Path) -> dict:
    """The sweep config (layout in the module docstring), checked before any training.

    Raises:
        EvalError: an unreadable file, a missing key, an empty grid axis, an unknown method, a method
            the trainer cannot run, or a baseline that is not one of the settings.
    """
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EvalError(f"{path}: cannot read the sweep config ({e})") from None
    if not isinstance(cfg, dict):
        raise EvalError(f"{path}: expected a YAML mapping with keys {', '.join(_REQUIRED)}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise EvalError(f"{path}: missing {', '.join(missing)} (see `kdengine sweep --help`)")
    grid = cfg["grid"]
    if not isinstance(grid, dict) or "method" not in grid:
        raise EvalError(f"{path}: grid must be a mapping with a 'method' list")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise EvalError(f"{path}: grid.{key} must be a non-empty list, got {values!r}")
    for method in grid["method"]:
        if method != "ce" and method not in KD_METHODS:
            raise EvalError(f"{path}: unknown method {method!r}; expected ce or one of {', '.join(KD_METHODS)}")
    if not isinstance(cfg["seeds"], list) or not cfg["seeds"]:
        raise EvalError(f"{path}: seeds must be a non-empty list of integers")
    settings = grid_settings(grid)
    baseline = cfg.get("baseline") or settings[0]
    matches = [s for s in settings if all(s.get(k) == v for k, v in baseline.items())]
    if not matches:
        raise EvalError(f"{path}: baseline {baseline} matches no setting of the grid")
    cfg["baseline"] = baseline
    cfg.setdefault("train", {})
    cfg.setdefault("gsm8k", {})
    return cfg


def grid_settings(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cells(cfg: dict) -> list[Cell]:
    return [Cell(setting, int(seed)) for setting in grid_settings(cfg["grid"]) for seed in cfg["seeds"]]


def train_argv(cfg: dict, cell: Cell, run_dir: Path) -> list[str]:
    """The `kdengine train` flags of one cell: the shared `train` flags, the cell's setting, its seed."""
    flags = {"steps": 100, **cfg["train"]}
    flags.setdefault("save_every", max(1, int(flags["steps"]) // 4))
    for key, value in cell.setting.items():
        if key == "method":
            if value == "ce":
                flags["alpha"] = 0.0
            else:
                flags["divergence"] = value
        else:
            flags[key] = value
    argv = ["--student", str(cfg["student"]), "--store", str(cfg["store"]), "--out", str(run_dir),
            "--seed", str(cell.seed), "--resume", "--workers", "0"]
    from kdengine.train.config import spec_of

    for key, value in flags.items():
        flag = key.replace("_", "-")
        if value is True:  # an on/off option: `tail: true` is --tail
            argv.append(f"--{flag}")
        elif value is False:  # off: the default of a plain flag, else its --no- form
            spec = spec_of(key)
            argv += [] if spec is not None and spec.default is False else [f"--no-{flag}"]
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def check_cells(cfg: dict) -> None:
    """Parses every cell's `kdengine train` flags before any cell trains, so that a bad grid or train
    key fails at once rather than after the cells before it."""
    from kdengine.train.command import parse_config

    for cell in cells(cfg):
        argv = train_argv(cfg, cell, Path(cfg["out"]) / "cells" / cell.ident / "run")
        try:
            parse_config(argv, prog=f"kdengine sweep ({cell.ident})")
        except SystemExit as e:  # the trainer printed why
            raise EvalError(f"cell {cell.ident}: `kdengine train {' '.join(argv)}` refuses its flags (exit {e.code}); "
                            "fix the sweep's train/grid keys (e.g. --divergence rkl and jsd need `tail: true` "
                            "under train)") from None


def train_cell(cfg: dict, cell: Cell, extra: list[str] = (), progress: bool = True) -> Path:
    """Trains one cell into OUT/cells/<id>/run (resuming a killed run); returns the run dir."""
    from kdengine.train import TrainError, main as train_main

    run_dir = Path(cfg["out"]) / "cells" / cell.ident / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if (run_dir / "final" / "config.json").is_file() and not extra:
        return run_dir  # trained; killed while being evaluated
    try:
        train_main(train_argv(cfg, cell, run_dir) + list(extra), prog=f"kdengine sweep ({cell.ident})")
    except TrainError as e:
        raise EvalError(f"cell {cell.ident}: {e}") from None
    except SystemExit as e:  # the trainer refused a flag and printed why
        raise EvalError(f"cell {cell.ident}: `kdengine train {' '.join(train_argv(cfg, cell, run_dir))}` "
                        f"refused its flags (exit {e.code}); fix the sweep's train/grid keys") from None
    return run_dir


def run_sweep(cfg: dict, *, progress: bool = True) -> dict:
    """Trains every unfinished cell, evaluates it, writes the tables and figures; returns
    {"cells": rows, "summary": rows, "skipped": ids of cells finished before this run}."""
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    check_cells(cfg)
    skipped, todo = [], []
    for cell in cells(cfg):
        (skipped if (out / "cells" / cell.ident / "result.json").is_file() else todo).append(cell)
    for i, cell in enumerate(todo, start=1):
        _say(progress, f"[{i}/{len(todo)}] train {cell.ident}" + (f" ({len(skipped)} finished before)" if i == 1 and
                                                                 skipped else ""))
        clock = time.perf_counter()
        run_dir = train_cell(cfg, cell, progress=progress)
        _evaluate_cell(cfg, cell, run_dir, time.perf_counter() - clock, progress)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    rows = [json.loads((out / "cells" / c.ident / "result.json").read_text()) for c in cells(cfg)]
    summary = summarize(rows, cfg["baseline"])
    from kdengine.evals.sweep_report import write_sweep_report

    write_sweep_report(out, rows, summary, cfg)
    return {"cells": rows, "summary": summary, "skipped": [c.ident for c in skipped]}


def _evaluate_cell(cfg: dict, cell: Cell, run_dir: Path, train_s: float, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kdengine.corpus import load_corpus
    from kdengine.evals import evaluate_model
    from kdengine.evals.distill import distill_metrics
    from kdengine.teachers import load_teacher

    cell_dir = run_dir.parent
    final = run_dir / "final"
    teacher = load_teacher(str(cfg["teacher"]), device="cpu", dtype="fp32")
    samples = load_corpus(cfg["heldout"], teacher.tokenizer, chat=True).samples
    student = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    held = distill_metrics(teacher, {"student": student}, samples, progress=progress)["student"]
    params = sum(p.numel() for p in student.parameters())
    del teacher, student
    g = {"limit": None, "max_new_tokens": 128, "batch_size": 16, **cfg["gsm8k"]}
    gsm_dir = cell_dir / "gsm8k"
    shutil.rmtree(gsm_dir, ignore_errors=True)  # a half-written report of a killed evaluation
    _, report = evaluate_model(str(final), cfg["heldout"], chat=True, limit=g["limit"], batch_size=g["batch_size"],
                               max_new_tokens=g["max_new_tokens"], log_dir=gsm_dir, device="cpu", progress=progress)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    row = {"cell": cell.ident, "setting": cell.setting_id, **cell.setting, "seed": cell.seed,
           "kl_to_teacher": held.kl_to_teacher, "top1_agreement": held.top1_agreement, "perplexity": held.perplexity,
           "heldout_positions": held.positions, "gsm8k_accuracy": report["accuracy"], "gsm8k_n": report["n"],
           "seconds_per_token": report["generate_s"] / max(report["new_tokens"], 1), "params": params,
           "steps": len(metrics), "final_loss": metrics[-1]["loss"], "train_s": train_s}
    from kdengine.durable import write_atomic

    write_atomic(cell_dir / "result.json", (json.dumps(row, indent=2) + "\n").encode())


def summarize(rows: list[dict], baseline: dict) -> list[dict]:
    """Per setting and metric: n, mean, std, 95% CI half-width (t distribution), and against the
    baseline setting (paired by seed): mean difference, paired t-test p-value, Cohen's d_z."""
    import pandas as pd
    from scipy import stats

    from kdengine.evals.distill import t_interval

    frame = pd.DataFrame(rows)
    base_id = next(r["setting"] for r in rows if all(r.get(k) == v for k, v in baseline.items()))
    out = []
    for setting, group in frame.groupby("setting", sort=False):
        for metric in METRICS:
            values = group[metric].to_numpy(dtype=float)
            n = len(values)
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            mean, half = t_interval(values)
            row = {"setting": setting, "metric": metric, "n": n, "mean": mean, "std": std,
                   "ci95": half, "baseline": base_id}
            if setting != base_id:
                paired = group.merge(frame[frame.setting == base_id], on="seed", suffixes=("", "_base"))
                diff = (paired[metric] - paired[f"{metric}_base"]).to_numpy(dtype=float)
                row["diff"] = float(diff.mean()) if len(diff) else float("nan")
                if len(diff) > 1 and diff.std(ddof=1) > 0:
                    test = stats.ttest_rel(paired[metric], paired[f"{metric}_base"])
                    row.update(t=float(test.statistic), p=float(test.pvalue),
                               cohens_d=float(diff.mean() / diff.std(ddof=1)), pairs=len(diff))
                else:
                    row.update(t=None, p=None, cohens_d=None, pairs=len(diff))
            out.append(row)
    return out


def _say(progress: bool, message: str) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(message)
