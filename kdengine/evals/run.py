"""The two ways to run the GSM8K evaluation, end to end: score a file of responses, or generate them
with a model first. Inputs are checked before any model work and before the log dir is touched."""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path

from kdengine.evals.data import read_problems
from kdengine.evals.generation import STOP, build_prompts, generate_all
from kdengine.evals.gsm8k import DEFAULT_CASCADE, EvalError
from kdengine.evals.report import build_report, check_log_dir, write_report


def default_log_dir(name: str, when: datetime) -> Path:
    """logs/gsm8k-<name>-<UTC timestamp>/ under the current directory; `name` is reduced to its last
    path component and to characters that are safe in a file name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(name).rstrip("/\\")).name).strip("-.") or "model"
    return Path("logs") / f"gsm8k-{slug}-{when.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def evaluate_responses(responses_file: str | Path, log_dir: str | Path | None = None, *,
                       cascade: str = DEFAULT_CASCADE) -> tuple[Path, dict]:
    """Scores a JSONL file of `question`, `answer`, `response` lines and writes the reports.

    Args:
        responses_file: the JSONL file.
        log_dir: where the reports go; default logs/gsm8k-<file stem>-<UTC timestamp>/.
        cascade: the extraction cascade (gsm8k.CASCADES).
    Returns:
        (the log dir, the report as written to report.json).
    Raises:
        EvalError: a bad line in the file (FILE:LINE: ...), or a log dir that already holds a report.
    """
    started = datetime.now(timezone.utc)
    problems = read_problems(responses_file, with_response=True)
    log_dir = Path(log_dir) if log_dir is not None else default_log_dir(Path(responses_file).stem, started)
    check_log_dir(log_dir)
    report = build_report(problems, [problem.response for problem in problems],
                          {"responses_file": str(responses_file)}, cascade=cascade)
    write_report(log_dir, report, problems)
    return log_dir, report


def evaluate_model(model: str, data: str | Path, *, backend: str = "hf", limit: int | None = None,
                   batch_size: int = 8, max_new_tokens: int = 512, chat: bool = False,
                   fewshot: str | Path | None = None, log_dir: str | Path | None = None,
                   device: str | None = None, dtype: str | None = None, backend_opts: dict | None = None,
                   progress: bool = True, cascade: str = DEFAULT_CASCADE) -> tuple[Path, dict]:
    """Generates greedy answers to the problems in `data` with `model`, scores them, writes the reports.

    Args:
        model: what `kdengine.teachers.load_teacher` loads (a from_pretrained dir or a GGUF file).
        data: JSONL of GSM8K `question`/`answer` lines.
        backend: the teacher backend (kdengine.teachers.BACKENDS).
        device: "cpu", "cuda" or "cuda:N"; None: for hf, cuda when available, else cpu; for other
            backends, their own default (exl2: all visible GPUs).
        dtype: "fp32", "bf16" or "fp16"; None: for hf, bf16 on cuda and fp32 on cpu; for other
            backends, their own default (exl2: fp16). Recorded in the report as given (null: the
            backend's default).
        backend_opts: options only the backend knows (exl2: gpu_split), passed to load_teacher.
        limit: use only the first `limit` problems.
        batch_size: prompts per generate call.
        max_new_tokens: the cap on each answer's length.
        chat: format prompts with the tokenizer's chat template (see generation.build_prompts).
        fewshot: JSONL of GSM8K examples put before every question.
        log_dir: where the reports go; default logs/gsm8k-<model name>-<UTC timestamp>/.
        progress: show tqdm progress.
        cascade: the extraction cascade (gsm8k.CASCADES).
    Returns:
        (the log dir, the report as written to report.json).
    Raises:
        EvalError: a bad line in `data` or `fewshot`, a log dir that already holds a report, a model
            the backend cannot load (device, dtype, path), or `chat` with a tokenizer that has no
            chat template.
    """
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    problems = read_problems(data)[:limit]
    shots = read_problems(fewshot) if fewshot is not None else []
    if log_dir is not None:
        log_dir = Path(log_dir)
        check_log_dir(log_dir)

    import torch

    from kdengine.teachers import TeacherError, load_teacher

    if backend == "hf":  # transformers runs anywhere: use the GPU when there is one
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    try:
        teacher = load_teacher(model, backend=backend, device=device, dtype=dtype, **(backend_opts or {}))
    except TeacherError as e:
        raise EvalError(str(e)) from None
    load_s = time.perf_counter() - clock
    prompts = build_prompts([problem.question for problem in problems], shots, chat=chat,
                            tokenizer=teacher.tokenizer)
    run = generate_all(teacher, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    first_prompt = prompts[0] if isinstance(prompts[0], str) else teacher.tokenizer.decode(prompts[0])
    settings = {
        "model": teacher.name,
        "backend": backend,
        "device": str(teacher.device),
        "dtype": dtype,
        "data": str(data),
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat": chat,
                     "fewshot": None if fewshot is None else str(fewshot), "n_fewshot": len(shots),
                     "stop": [*STOP, "EOS"]},
        "new_tokens": sum(run.new_tokens),
        "hit_max_new_tokens": sum(tokens >= max_new_tokens for tokens in run.new_tokens),
        "tokens_per_s": run.tokens_per_s,
        "load_s": load_s,
        "generate_s": run.seconds,
        "first_prompt": first_prompt,
    }
    report = build_report(problems, run.texts, settings, cascade=cascade)
    items = report.pop("items")  # wall_s goes before the long item list
    report["wall_s"] = time.perf_counter() - clock
    report["items"] = items
    log_dir = log_dir if log_dir is not None else default_log_dir(teacher.name, started)
    write_report(log_dir, report, problems)
    return log_dir, report
