"""`kdengine bench`: what each model costs to serve on this machine, and when distilling pays off.

For every model, in the order given, a fresh subprocess (so that load time and peak memory are its
own) measures (`measure_model`):

- `params`, `size_on_disk_mb` (the weight files), `load_s`;
- latency per query at batch 1 over the first `latency_queries` prompts: `latency_p50_s`, `latency_p95_s`;
- throughput over all prompts at `batch_size`: `tokens_per_s` (generated), `prompt_tokens_per_s`,
  with the `new_tokens` and `generate_s` they come from (tokens_per_s x generate_s = new_tokens);
- `peak_memory_mb`: the subprocess's peak RSS (torch and Python included; `rss_before_load_mb` says
  how much of it was there before the model), or CUDA max allocated on a GPU;
- `energy_j_per_1k_queries` for the throughput run: from RAPL (`/sys/class/powercap/intel-rapl*`, the
  whole CPU package, other processes included) where it is readable, `energy_source` "rapl"; else an
  estimate, CPU-seconds of the process x `cpu_watts` watts per busy core, `energy_source` "estimate".

Break-even (`break_even`): the first model is the one being replaced (the teacher), every other one a
student. The cost of distilling is read from the run directories kdengine wrote (`distill_cost`): a
demo's OUT/ (summary.json: its dump and train stages) or a training run (metrics.jsonl: the time of
its steps). Queries until a student has paid for itself = distillation energy / energy saved per query,
and the same in time (distillation wall time / latency saved per query).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from kdengine.evals.gsm8k import EvalError

DEFAULT_CPU_WATTS = 10.0  # per busy core: a server core under load draws roughly 5-15 W
POWERCAP = Path("/sys/class/powercap")
REPORT_KEYS = ("model", "params", "latency_p50_s", "latency_p95_s", "tokens_per_s", "peak_memory_mb",
               "energy_j_per_1k_queries", "energy_source")


# ---- energy --------------------------------------------------------------------------------------
def rapl_domains(root: Path = POWERCAP) -> list[Path]:
    """The readable top-level RAPL package domains under `root` (intel-rapl:N, not their subzones)."""
    found = []
    for zone in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
        if zone.name.count(":") == 1 and os.access(zone / "energy_uj", os.R_OK):
            try:
                int((zone / "energy_uj").read_text())
            except (OSError, ValueError):
                continue
            found.append(zone)
    return found


def read_rapl_uj(domains: Sequence[Path]) -> list[int]:
    return [int((zone / "energy_uj").read_text()) for zone in domains]


def rapl_joules(domains: Sequence[Path], before: Sequence[int], after: Sequence[int]) -> float:
    """Energy between two readings, in joules, counting a counter that wrapped once."""
    total = 0
    for zone, a, b in zip(domains, before, after):
        if b < a:
            b += int((zone / "max_energy_range_uj").read_text())
        total += b - a
    return total / 1e6


# ---- one model -----------------------------------------------------------------------------------
def measure_model(model: str, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int,
                  latency_queries: int, device: str = "cpu", dtype: str | None = None,
                  cpu_watts: float = DEFAULT_CPU_WATTS, powercap: Path = POWERCAP) -> dict:
    """Measures one model in this process (bench runs it in a fresh subprocess per model).

    Returns:
        One entry of report.json's `models` (keys in the module docstring).
    """
    import resource
    import time

    import numpy as np
    import torch

    from kdengine.teachers import load_teacher
    from kdengine.teachers.encoding import encode_text

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    clock = time.perf_counter()
    teacher = load_teacher(model, device=device, dtype=dtype)
    load_s = time.perf_counter() - clock
    teacher.generate([prompts[0]], max_new_tokens=2)  # warm-up: first-call allocations are not a query's cost

    latencies = []
    for prompt in prompts[:latency_queries]:
        clock = time.perf_counter()
        teacher.generate([prompt], max_new_tokens=max_new_tokens)
        latencies.append(time.perf_counter() - clock)

    domains = rapl_domains(powercap)
    rapl_before = read_rapl_uj(domains)
    cpu_before, clock = time.process_time(), time.perf_counter()
    new_tokens = 0
    for first in range(0, len(prompts), batch_size):
        new_tokens += sum(g.new_tokens for g in teacher.generate(list(prompts[first:first + batch_size]),
                                                                  max_new_tokens=max_new_tokens))
    generate_s, cpu_s = time.perf_counter() - clock, time.process_time() - cpu_before
    if domains:
        energy_j, source = rapl_joules(domains, rapl_before, read_rapl_uj(domains)), "rapl"
    else:
        energy_j, source = cpu_s * cpu_watts, "estimate"

    on_cuda = torch.device(teacher.device).type == "cuda"
    peak_mb = (torch.cuda.max_memory_allocated(teacher.device) / 2**20 if on_cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    prompt_tokens = sum(len(encode_text(teacher.tokenizer, p)) for p in prompts)
    return {
        "model": model,
        "params": sum(p.numel() for p in teacher.model.parameters()),
        "size_on_disk_mb": _size_on_disk(Path(model)) / 2**20,
        "load_s": load_s,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "latency_queries": len(latencies),
        "batch_size": batch_size,
        "queries": len(prompts),
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "generate_s": generate_s,
        "tokens_per_s": new_tokens / generate_s,
        "prompt_tokens_per_s": prompt_tokens / generate_s,
        "cpu_s": cpu_s,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": "cuda_max_allocated" if on_cuda else "rss",
        "rss_before_load_mb": rss_before,
        "energy_j": energy_j,
        "energy_j_per_1k_queries": energy_j / len(prompts) * 1000,
        "energy_source": source,
        "energy_note": ("RAPL package energy during the throughput run (other processes included)" if domains
                        else f"estimate: {cpu_s:.1f} CPU-seconds x {cpu_watts:g} W per busy core"),
        "device": str(teacher.device),
    }


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    weights = [p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
    return sum(p.stat().st_size for p in (weights or [p for p in path.rglob("*") if p.is_file()]))


# ---- the cost of distilling ---------------------------------------------------------------------
def distill_cost(run_dirs: Sequence[str | Path], *, cpu_watts: float = DEFAULT_CPU_WATTS) -> dict:
    """Wall time and (estimated) energy of the distillation runs kdengine wrote.

    A demo's OUT/ counts its `dump` and `train` stages (summary.json; the CE baseline and the
    evaluations are not part of distilling); a training run counts the time of its logged steps
    (metrics.jsonl: targets / targets_per_s per record). Energy = wall time x busy cores x cpu_watts:
    an estimate, since no run records its CPU energy.

    Raises:
        EvalError: a directory that holds neither file.
    """
    runs, wall_s, core_s = [], 0.0, 0.0
    for run_dir in map(Path, run_dirs):
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            cores = summary["run"]["threads"]
            parts = {name: summary["stages"][name]["wall_s"] for name in ("dump", "train")}
        elif (run_dir / "metrics.jsonl").is_file():
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            cores = os.cpu_count() or 1
            parts = {"train": sum(r["targets"] / r["targets_per_s"] for r in records if r["targets_per_s"] > 0)}
        else:
            raise EvalError(f"{run_dir}: not a kdengine run directory (no summary.json from `kdengine demo`, no "
                            "metrics.jsonl from `kdengine train`); pass --distill-run with one of those")
        seconds = sum(parts.values())
        runs.append({"dir": str(run_dir), "wall_s": seconds, "parts_s": parts, "busy_cores": cores})
        wall_s += seconds
        core_s += seconds * cores
    return {"runs": runs, "wall_s": wall_s, "energy_j": core_s * cpu_watts, "energy_source": "estimate",
            "cpu_watts": cpu_watts}


def break_even(models: Sequence[dict], cost: dict) -> dict:
    """Queries after which each student (models[1:]) has paid back the distillation cost against models[0].

    Per query, the saving is the teacher's energy (latency at batch 1) minus the student's; when a
    student saves nothing it never pays back (null, with the reason).
    """
    teacher = models[0]
    students = []
    for student in models[1:]:
        saved_j = (teacher["energy_j_per_1k_queries"] - student["energy_j_per_1k_queries"]) / 1000
        saved_s = teacher["latency_p50_s"] - student["latency_p50_s"]
        students.append({
            "model": student["model"],
            "energy_saved_j_per_query": saved_j,
            "latency_saved_s_per_query": saved_s,
            "queries_to_break_even_energy": cost["energy_j"] / saved_j if saved_j > 0 else None,
            "queries_to_break_even_time": cost["wall_s"] / saved_s if saved_s > 0 else None,
            **({} if saved_j > 0 else {"note": "the student uses no less energy per query: it never pays back"}),
        })
    return {"teacher": teacher["model"], "inputs": {"distill": cost, "teacher_energy_j_per_1k_queries":
                                                    teacher["energy_j_per_1k_queries"],
                                                    "teacher_latency_p50_s": teacher["latency_p50_s"]},
            "students": students}


# ---- the whole run ------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """The `prompt` field of every non-blank line of a JSONL file.

    Raises:
        EvalError: FILE:LINE for a line that is not a JSON object with a string `prompt`, or no prompts.
    """
    from kdengine.jsonl import JsonlError, read_jsonl

    prompts = []
    try:
        for lineno, record in read_jsonl(path):
            if isinstance(record, JsonlError):
                raise EvalError(f"{path}:{lineno}: {record}")
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise EvalError(f"{path}:{lineno}: expected a JSON object with a string field 'prompt'")
            prompts.append(record["prompt"])
    except OSError as e:
        raise EvalError(f"{path}: cannot read the file ({e.strerror})") from None
    if not prompts:
        raise EvalError(f"{path}: no prompts (expected one JSON object with a 'prompt' field per line)")
    return prompts


def default_prompts(n: int = 16) -> list[str]:
    """`n` of the demo's word problems, as plain "Question: ...\\nAnswer:" prompts."""
    from kdengine.demo.problems import generate_problems

    return [f"Question: {p.question}\nAnswer:" for p in generate_problems(n, seed=1234)]


def run_bench(models: Sequence[str], *, prompts: Sequence[str], out: str | Path, batch_size: int = 8,
              max_new_tokens: int = 64, latency_queries: int = 8, device: str = "cpu", dtype: str | None = None,
              cpu_watts: float = DEFAULT_CPU_WATTS, distill_runs: Sequence[str | Path] = (),
              progress: bool = True) -> dict:
    """Benchmarks `models` one after another, each in its own subprocess; writes OUT/report.json,
    report.md and report.png and returns the report.

    Raises:
        EvalError: no models, a model that fails to load or run (its stderr's last line), a bad run dir.
    """
    from kdengine.durable import write_atomic

    if not models:
        raise EvalError("pass at least one --model")
    cost = distill_cost(distill_runs, cpu_watts=cpu_watts) if distill_runs else None
    dtype = dtype or ("bf16" if device.split(":")[0] == "cuda" else "fp32")  # as `kdengine eval` chooses
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": _torch_threads(),
               "load_average_start": list(os.getloadavg())}
    rows = []
    for i, model in enumerate(models, start=1):
        if progress:
            print(f"[{i}/{len(models)}] {model}: load, {latency_queries} queries at batch 1, "
                  f"{len(prompts)} at batch {batch_size}", file=sys.stderr, flush=True)
        rows.append(_measure_in_subprocess(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                           latency_queries=latency_queries, device=device, dtype=dtype,
                                           cpu_watts=cpu_watts))
    machine["load_average_end"] = list(os.getloadavg())
    report = {"models": rows,
              "settings": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "queries": len(prompts),
                           "latency_queries": latency_queries, "device": device, "dtype": dtype,
                           "cpu_watts": cpu_watts, "greedy": True},
              "machine": machine,
              "break_even": break_even(rows, cost) if cost is not None and len(rows) > 1 else None}
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    from kdengine.evals.bench_report import plot_report, report_markdown

    write_atomic(out / "report.md", report_markdown(report).encode())
    plot_report(report, out / "report.png")
    return report


def _measure_in_subprocess(model: str, prompts: Sequence[str], **options) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdengine-bench-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"model": model, "prompts": list(prompts), "options": options}))
        proc = subprocess.run([sys.executable, "-m", "kdengine.evals.bench", str(job), str(result)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EvalError(f"--model {model}: the benchmark failed ({last})")
        return json.loads(result.read_text())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with its x86 family and model (from /proc/cpuinfo), else what platform
    knows; for every benchmark's header. Virtual machines often report a bare "AMD EPYC" for cores
    as different as Zen 1 and Zen 4, so the family and model (and, for AMD, the core generation they
    stand for) are what tells two hosts apart."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    if not (family.isdigit() and model.isdigit()):
        return name
    generation = _amd_generation(int(family), int(model)) if fields.get("vendor_id") == "AuthenticAMD" else None
    return f"{name} (family {family}, model {model}{', ' + generation if generation else ''})"


def _amd_generation(family: int, model: int) -> str | None:
    """AMD's core generation for a family/model pair (AMD's published model ranges), None if unknown."""
    if family == 0x17:
        return "Zen/Zen+" if model < 0x30 else "Zen 2"
    if family == 0x19:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF else "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":  # the per-model subprocess of run_bench: job.json in, result.json out
    _job = json.loads(Path(sys.argv[1]).read_text())
    try:
        _row = measure_model(_job["model"], _job["prompts"], **_job["options"])
    except Exception as exc:  # reported to the parent as its last stderr line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    Path(sys.argv[2]).write_text(json.dumps(_row))
