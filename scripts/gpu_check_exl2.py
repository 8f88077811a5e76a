#!/usr/bin/env python
"""GPU check of the EXL2 teacher against the fp16 HF teacher it was quantized from.

Converts a small HF model to EXL2 at each --bpw, runs the same corpus through both teachers and
reports, over every target position of the corpus (the positions a dump stores):

  top1      fraction of positions where both teachers' most likely next token is the same
  overlap   mean |A ∩ B| / K, with A and B the two teachers' top-K token sets
  kl_topk   mean KL(hf ‖ exl2) over K+1 buckets: each of hf's top-K tokens, and all other tokens
            together (the distribution a top-K + tail loss sees), in nats:
              sum_{i in A} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)
            p, q the full-vocabulary softmax of hf and exl2; p_rest = 1 - sum_{i in A} p_i, likewise q_rest
  kl_full   mean KL(hf ‖ exl2) over the whole vocabulary, in nats (kl_topk <= kl_full always)
  tok/s     tokens per second through teacher.logits() + the device-side top-K (the dump's GPU part)

and three consistency checks of exl2's logits (max |Δlogit|, should be fp16 noise, ~1e-2 or less):
causal (a prefix scored alone vs inside the full sequence), chunked (cache chunks of 1/3 the sample
vs one pass) and padded (batched padded prefill vs per-sequence prefill). Stage dump then runs
`kdengine dump` itself with each teacher and reports its
wall-clock tokens/s and the stored top-1/top-K agreement. Last, a GSM8K smoke test: a few problems
through generate() on each teacher. Targets at 8.0 bpw: top1 >= 0.99, kl_topk <= 1e-3.

Prerequisites on the GPU machine: torch with CUDA; transformers; exllamav2==0.3.2 and the modules it
imports (pandas, fastparquet, rich, ninja, pillow, safetensors, tokenizers); gguf for --from-gguf;
kdengine importable (PYTHONPATH=<repo root>). exllamav2 JIT-builds its CUDA extension the first time it
is imported (minutes): the script sets TORCH_CUDA_ARCH_LIST (--cuda-arch), MAX_JOBS (--max-jobs) and
TORCH_EXTENSIONS_DIR (under --work) before that, so later stages and commands reuse the build.

Run it all at once, or stage by stage (each stage skips what --work already holds):
    PYTHONPATH=$PWD python scripts/gpu_check_exl2.py --work /tmp/kd-exl2 \\
        --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --data gsm8k.jsonl \\
        --stages build,hf,convert,compare,dump,generate
The table is printed last and written, with the raw numbers as JSON, to $OUT (if set) or --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

STAGES = ("build", "hf", "convert", "compare", "dump", "generate")


# --- metrics (pure torch; unit-tested on CPU) ----------------------------------------------------

def agreement_sums(ref_logits: torch.Tensor, test_logits: torch.Tensor, k: int) -> dict[str, float]:
    """Sums over rows of the per-position agreement between a reference and a test teacher.

    Args:
        ref_logits: float [N, V], the reference (hf) logits of N positions.
        test_logits: float [N, V], the test (exl2) logits of the same positions.
        k: top-K size, 1 <= k <= V.
    Returns:
        {"n", "top1", "overlap", "kl_topk", "kl_full"}: row count and the sums over rows of
        top-1 match (0/1), |A ∩ B| / k, the (k+1)-bucket KL and the full KL (definitions in the module
        docstring), computed in float64.
    """
    if ref_logits.shape != test_logits.shape or ref_logits.dim() != 2:
        raise ValueError(f"need two [N, V] tensors of one shape, got {tuple(ref_logits.shape)} "
                         f"and {tuple(test_logits.shape)}")
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    test = torch.log_softmax(test_logits.double(), dim=-1)
    ref_top, ref_idx = ref.topk(k, dim=-1)
    test_idx = test.topk(k, dim=-1).indices
    top1 = ref_idx[:, 0] == test_idx[:, 0]
    overlap = (ref_idx[:, :, None] == test_idx[:, None, :]).any(-1).sum(-1) / k
    kl_in = (ref_top.exp() * (ref_top - test.gather(-1, ref_idx))).sum(-1)
    rest_ref = ref.scatter(-1, ref_idx, float("-inf")).logsumexp(-1)  # log p_rest, exact even when tiny
    rest_test = test.scatter(-1, ref_idx, float("-inf")).logsumexp(-1)
    kl_rest = torch.where(torch.isneginf(rest_ref), 0.0, rest_ref.exp() * (rest_ref - rest_test))
    kl_full = (ref.exp() * (ref - test)).sum(-1)
    return {"n": ref.shape[0], "top1": top1.sum().item(), "overlap": overlap.sum().item(),
            "kl_topk": (kl_in + kl_rest).sum().item(), "kl_full": kl_full.sum().item()}


@dataclass
class Agreement:
    """Running agreement between two teachers over batches of positions (agreement_sums, chunked)."""

    k: int
    n: int = 0
    top1: float = 0.0
    overlap: float = 0.0
    kl_topk: float = 0.0
    kl_full: float = 0.0

    def update(self, ref_logits: torch.Tensor, test_logits: torch.Tensor, rows_per_chunk: int = 1024) -> None:
        for start in range(0, ref_logits.shape[0], rows_per_chunk):
            sums = agreement_sums(ref_logits[start:start + rows_per_chunk], test_logits[start:start + rows_per_chunk],
                                  self.k)
            for key, value in sums.items():
                setattr(self, key, getattr(self, key) + value)

    def means(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"positions": self.n, "top1": self.top1 / n, "overlap": self.overlap / n,
                "kl_topk": self.kl_topk / n, "kl_full": self.kl_full / n}


# --- stages --------------------------------------------------------------------------------------

def stage_build(args) -> dict:
    """Imports exllamav2 once, which JIT-builds its extension into TORCH_EXTENSIONS_DIR if needed."""
    start = time.perf_counter()
    import exllamav2  # noqa: F401

    seconds = time.perf_counter() - start
    print(f"exllamav2 {exllamav2.__version__} imported in {seconds:.0f} s (extension built or reused)")
    return {"import_s": seconds}


def stage_hf(args) -> Path:
    """The fp16 HF model directory to quantize: --hf-model as given, or --from-gguf dequantized; its
    config.json gets the transformers-4 RoPE keys that exllamav2 0.3.2 reads."""
    target = args.work / "hf"
    if (target / "config.json").is_file():
        print(f"hf: {target} exists, reused")
        return target
    tmp = args.work / "hf.tmp"
    if args.from_gguf:
        _gguf_to_hf(args.from_gguf, tmp)
    elif args.hf_model:
        _link_hf_dir(args.hf_model, tmp)
    else:
        sys.exit(f"hf: {target} does not exist yet; pass --from-gguf FILE or --hf-model DIR")
    _add_legacy_rope_keys(tmp / "config.json")
    tmp.rename(target)
    return target


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    kwargs = {}
    try:  # newer transformers keep GGUF blocks packed unless asked to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    packed = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16, **kwargs)
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    dense.load_state_dict(packed.state_dict(), strict=True)
    dense.generation_config = packed.generation_config
    dense.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    print(f"hf: {gguf.name} -> {out} (fp16 safetensors) in {time.perf_counter() - start:.0f} s")


def _link_hf_dir(source: Path, out: Path) -> None:
    out.mkdir(parents=True)
    for item in source.iterdir():
        if item.name == "config.json":
            (out / item.name).write_text(item.read_text(encoding="utf-8"), encoding="utf-8")
        else:
            (out / item.name).symlink_to(item.resolve())


def _add_legacy_rope_keys(config_path: Path) -> None:
    from kdengine.teachers.exl2 import legacy_rope_keys

    config = json.loads(config_path.read_text(encoding="utf-8"))
    legacy = legacy_rope_keys(config)
    if legacy:
        config.update(legacy)
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        print(f"hf: added {legacy} to config.json for exllamav2's converter")


def stage_convert(args, hf_dir: Path) -> dict:
    """EXL2 directories at each --bpw with exllamav2's converter (its default calibration set); the
    first conversion's measurement is reused by the others."""
    timings = {}
    measurement = None
    for bpw in args.bpw:
        out, job = exl2_dir(args, bpw), args.work / f"exl2-{bpw}-job"
        if _is_converted(out):
            print(f"convert {bpw}: {out} exists, reused")
        else:
            head_bits = args.head_bits or (8 if bpw >= 6 else 6)
            cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(hf_dir), "-o", str(job),
                   "-cf", str(out), "-b", str(bpw), "-hb", str(head_bits)]
            if measurement is not None and not (job / "job_new.json").exists():
                cmd += ["-m", str(measurement)]
            print(f"convert {bpw}: {' '.join(cmd)}", flush=True)
            start = time.perf_counter()
            log = args.work / f"convert-{bpw}.log"
            with open(log, "a", encoding="utf-8") as sink:
                rc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT).returncode
            if rc != 0 or not _is_converted(out):  # the converter exits 0 after printing some errors
                tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
                sys.exit(f"convert {bpw}: failed (exit {rc}); last lines of {log}:\n{tail}")
            timings[str(bpw)] = time.perf_counter() - start
            print(f"convert {bpw}: done in {timings[str(bpw)]:.0f} s")
        if (job / "measurement.json").exists():
            measurement = job / "measurement.json"
    return {"convert_s": timings}


def exl2_dir(args, bpw: float) -> Path:
    return args.work / f"exl2-{bpw}"


def _is_converted(out: Path) -> bool:
    config = out / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8")) \
        and any(out.glob("*.safetensors"))


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [B, T], right-padded
    lengths: torch.Tensor  # int64 [B]
    positions: list[torch.Tensor]  # per row: int64 [P_b], the target positions


def make_batches(samples, batch_size: int, pad_id: int) -> list[Batch]:
    """Length-sorted, right-padded batches of corpus samples (what the dump feeds a teacher)."""
    ordered = sorted(samples, key=lambda s: len(s.input_ids), reverse=True)
    batches = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start:start + batch_size]
        width = len(group[0].input_ids)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        for row, sample in enumerate(group):
            ids[row, :len(sample.input_ids)] = torch.from_numpy(sample.input_ids).long()
        lengths = torch.tensor([len(s.input_ids) for s in group], dtype=torch.long)
        batches.append(Batch(ids, lengths, [torch.from_numpy(s.positions).long() for s in group]))
    return batches


def target_rows(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[P, V]: the logits of every target position of the batch, rows in batch order."""
    return torch.cat([logits[row, pos.to(logits.device)] for row, pos in enumerate(batch.positions)])


def time_pass(teacher, batches: list[Batch], k: int) -> float:
    """Tokens per second through teacher.logits + topk_logprobs over all batches (after one warm-up)."""
    from kdengine.teachers import topk_logprobs

    topk_logprobs(teacher.logits(batches[0].input_ids, batches[0].lengths), k)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        topk_logprobs(teacher.logits(batch.input_ids, batch.lengths), k)
    torch.cuda.synchronize()
    return sum(int(b.lengths.sum()) for b in batches) / (time.perf_counter() - start)


def max_logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def stage_compare(args, hf_dir: Path) -> list[dict]:
    from kdengine.corpus import load_corpus
    from kdengine.teachers import load_teacher

    hf = load_teacher(hf_dir, backend="hf", device="cuda", dtype="fp16")
    corpus = load_corpus(args.data, hf.tokenizer, chat=args.chat, max_length=args.max_length)
    samples = corpus.samples[:args.max_samples]
    batches = make_batches(samples, args.batch_size, hf.tokenizer.pad_token_id)
    tokens = sum(len(s.input_ids) for s in samples)
    print(f"compare: {len(samples)} samples, {tokens} tokens, "
          f"{sum(len(s.positions) for s in samples)} target positions, {len(batches)} batches")
    hf_tok_s = time_pass(hf, batches, args.top_k)
    rows = []
    for bpw in args.bpw:
        exl2 = load_teacher(exl2_dir(args, bpw), backend="exl2", max_seq_len=args.max_length)
        if exl2.fingerprint != hf.fingerprint:
            sys.exit(f"compare {bpw}: the exl2 tokenizer fingerprint differs from the hf one")
        agreement = Agreement(args.top_k)
        for batch in batches:
            agreement.update(target_rows(hf.logits(batch.input_ids, batch.lengths), batch),
                             target_rows(exl2.logits(batch.input_ids, batch.lengths), batch))
        row = {"bpw": bpw, **agreement.means(), "tok_s_hf": hf_tok_s,
               "tok_s_exl2": time_pass(exl2, batches, args.top_k), "exl2_attention": exl2.attention}
        row.update(consistency_checks(args, bpw, exl2, batches))
        del exl2
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"compare {bpw}: {row}", flush=True)
    return rows


def consistency_checks(args, bpw: float, exl2, batches: list[Batch]) -> dict:
    """Max |Δlogit| of exl2 against itself: prefix alone vs in context, small cache chunks vs one
    pass, padded batched prefill vs per-sequence; and the padded policy's tokens/s."""
    from kdengine.teachers import load_teacher

    longest = batches[0]
    n = int(longest.lengths[0])
    ids = longest.input_ids[:1, :n]
    full = exl2.logits(ids, torch.tensor([n]))
    half = n // 2
    prefix = exl2.logits(ids[:, :half], torch.tensor([half]))
    out = {"causal_maxdiff": max_logit_diff(full[0, :half], prefix[0, :half])}
    if exl2.attention == "matmul":  # the backend turned 0.3.2's SDPA path off: show what that avoids
        exl2._config.no_sdpa = False
        try:
            out["causal_maxdiff_sdpa"] = max_logit_diff(exl2.logits(ids, torch.tensor([n]))[0, :half],
                                                        exl2.logits(ids[:, :half], torch.tensor([half]))[0, :half])
        finally:
            exl2._config.no_sdpa = True
    chunked = load_teacher(exl2_dir(args, bpw), backend="exl2", max_seq_len=args.max_length,
                           max_input_len=max(16, n // 3))
    out["chunked_maxdiff"] = max_logit_diff(chunked.logits(ids, torch.tensor([n]))[0], full[0])
    del chunked
    padded = load_teacher(exl2_dir(args, bpw), backend="exl2", max_seq_len=args.max_length, prefill="padded",
                          max_batch_size=args.batch_size)
    batch = batches[-1]  # the shortest: padded prefill handles rows up to max_input_len
    a = padded.logits(batch.input_ids, batch.lengths)
    b = exl2.logits(batch.input_ids, batch.lengths)
    out["padded_maxdiff"] = max((max_logit_diff(a[r, :int(n_)], b[r, :int(n_)])
                                 for r, n_ in enumerate(batch.lengths)), default=0.0)
    out["tok_s_exl2_padded"] = time_pass(padded, batches, args.top_k)
    del padded
    torch.cuda.empty_cache()
    return out


def stage_dump(args, hf_dir: Path) -> list[dict]:
    """`kdengine dump` of --data with each teacher (fresh stores under --work): wall-clock tokens/s
    (model load included) and, against the hf store, top-1 agreement and top-K overlap of what was stored."""
    from kdengine.store import open_store

    runs = [("hf", hf_dir, ["--device", "cuda", "--dtype", "fp16"])]
    runs += [(f"exl2-{bpw}", exl2_dir(args, bpw), ["--backend", "exl2", "--device", "cuda"]) for bpw in args.bpw]
    rows, reference = [], None
    for name, path, extra in runs:
        out = args.work / f"store-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "kdengine", "dump", "--teacher", str(path), "--data", str(args.data),
               "--out", str(out), "--top-k", str(args.top_k), "--max-length", str(args.max_length),
               "--batch-size", str(args.batch_size), *extra]
        print(f"dump {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        store = open_store(out)
        tokens = sum(len(store[i]["input_ids"]) for i in range(len(store)))
        row = {"teacher": name, "samples": len(store), "tokens": tokens, "wall_s": wall, "tok_s_wall": tokens / wall}
        if reference is None:
            reference = store
        else:
            row.update(store_agreement(reference, store, args.top_k))
        rows.append(row)
        print(f"dump {name}: {row}", flush=True)
    return rows


def store_agreement(ref_store, test_store, k: int) -> dict:
    """Top-1 agreement and mean top-K overlap between two stores of the same corpus, position by position."""
    if len(ref_store) != len(test_store):
        raise ValueError(f"the stores hold {len(ref_store)} and {len(test_store)} samples")
    n = top1 = overlap = 0.0
    for i in range(len(ref_store)):
        a, b = ref_store[i], test_store[i]
        if not (torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["positions"], b["positions"])):
            raise ValueError(f"sample {i}: the two stores hold different tokens or target positions")
        ia, ib = a["topk_idx"].long(), b["topk_idx"].long()
        n += ia.shape[0]
        top1 += (ia[:, 0] == ib[:, 0]).sum().item()
        overlap += ((ia[:, :, None] == ib[:, None, :]).any(-1).sum(-1) / k).sum().item()
    return {"store_top1": top1 / max(n, 1), "store_overlap": overlap / max(n, 1)}


def stage_generate(args, hf_dir: Path) -> list[dict]:
    from kdengine.evals.data import read_problems
    from kdengine.evals.generation import STOP, build_prompts
    from kdengine.evals.gsm8k import extract_answer, is_correct
    from kdengine.teachers import load_teacher

    problems = read_problems(args.gsm8k or args.data)[:args.gsm8k_n]
    rows, reference_texts = [], None
    for name, path, backend, opts in [("hf", hf_dir, "hf", {"device": "cuda", "dtype": "fp16"})] + [
            (f"exl2-{bpw}", exl2_dir(args, bpw), "exl2", {}) for bpw in args.bpw]:
        teacher = load_teacher(path, backend=backend, **opts)
        chat = bool(getattr(teacher.tokenizer, "chat_template", None))
        prompts = build_prompts([p.question for p in problems], chat=chat, tokenizer=teacher.tokenizer)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = teacher.generate(prompts, max_new_tokens=args.max_new_tokens, stop=list(STOP))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        texts = [o.text for o in outs]
        reference_texts = reference_texts or texts
        correct = sum(is_correct(*extract_answer(t), p.reference) for t, p in zip(texts, problems))
        rows.append({"model": name, "problems": len(problems), "correct": correct,
                     "new_tokens": sum(o.new_tokens for o in outs),
                     "tok_s": sum(o.new_tokens for o in outs) / seconds,
                     "same_text_as_hf": sum(t == r for t, r in zip(texts, reference_texts)),
                     "first_answer": texts[0][:160]})
        print(f"generate {name}: {rows[-1]}", flush=True)
        del teacher
        torch.cuda.empty_cache()
    return rows


# --- report --------------------------------------------------------------------------------------

def format_tables(compare: list[dict], dump: list[dict], generate: list[dict], device: str) -> str:
    lines = [f"# EXL2 vs fp16 HF teacher on {device}", ""]
    if compare:
        lines += ["| bpw | positions | top1 | overlap@K | KL top-K+tail | KL full | hf tok/s | exl2 tok/s "
                  "| exl2 padded tok/s | causal Δ | chunked Δ | padded Δ |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in compare:
            lines.append(f"| {r['bpw']} | {r['positions']} | {r['top1']:.4f} | {r['overlap']:.4f} | "
                         f"{r['kl_topk']:.2e} | {r['kl_full']:.2e} | {r['tok_s_hf']:.0f} | {r['tok_s_exl2']:.0f} | "
                         f"{r['tok_s_exl2_padded']:.0f} | {r['causal_maxdiff']:.3g} | {r['chunked_maxdiff']:.3g} | "
                         f"{r['padded_maxdiff']:.3g} |")
        lines.append(f"exl2 attention: {compare[0].get('exl2_attention', '?')}; K = top-K of the metrics; "
                     "Δ = max |Δlogit| of exl2 against itself (causal: prefix alone vs in context; chunked: "
                     "small cache chunks vs one pass; padded: batched padded vs per-sequence prefill)")
        sdpa = [f"{r['bpw']}: {r['causal_maxdiff_sdpa']:.3g}" for r in compare if "causal_maxdiff_sdpa" in r]
        if sdpa:
            lines.append(f"causal Δ with exllamav2 0.3.2's own SDPA path, which the backend turns off here: "
                         f"{', '.join(sdpa)}")
        lines.append("")
    if dump:
        lines += ["| kdengine dump | samples | tokens | wall s | tok/s (wall, load included) | stored top1 vs hf "
                  "| stored overlap@K vs hf |", "|---|---|---|---|---|---|---|"]
        for r in dump:
            agree = (f"{r['store_top1']:.4f} | {r['store_overlap']:.4f}" if "store_top1" in r else "- | -")
            lines.append(f"| {r['teacher']} | {r['samples']} | {r['tokens']} | {r['wall_s']:.1f} | "
                         f"{r['tok_s_wall']:.0f} | {agree} |")
        lines.append("")
    if generate:
        lines += ["| model | GSM8K correct | new tokens | gen tok/s | same text as hf |", "|---|---|---|---|---|"]
        for r in generate:
            lines.append(f"| {r['model']} | {r['correct']}/{r['problems']} | {r['new_tokens']} | {r['tok_s']:.0f} | "
                         f"{r['same_text_as_hf']}/{r['problems']} |")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", type=Path, required=True,
                   help="Working directory: the HF and EXL2 models, converter jobs and logs, the extension build.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-gguf", type=Path, help="A GGUF file to dequantize into the fp16 HF model (stage hf).")
    src.add_argument("--hf-model", type=Path, help="An fp16/bf16 HF model directory to quantize (stage hf).")
    p.add_argument("--data", type=Path, help="Corpus JSONL (kdengine dump's formats) for stage compare; with "
                                             "question/answer lines it also feeds stage generate.")
    p.add_argument("--chat", action="store_true", help="Format prompt/response corpus lines with the chat template.")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"Comma-separated stages to run, in this order: {','.join(STAGES)} (default: all).")
    p.add_argument("--bpw", type=float, nargs="+", default=[8.0, 4.0], help="EXL2 bits per weight to convert to.")
    p.add_argument("--head-bits", type=int, choices=[2, 3, 4, 5, 6, 8],
                   help="Bits of the output layer (default: 8 for bpw >= 6, else 6).")
    p.add_argument("--top-k", type=int, default=64, help="K of the top-K metrics and of the timed top-K.")
    p.add_argument("--max-samples", type=int, default=256, help="Corpus samples compared.")
    p.add_argument("--max-length", type=int, default=1024, help="Tokens kept per sample (and exl2's max_seq_len).")
    p.add_argument("--batch-size", type=int, default=16, help="Samples per logits() batch.")
    p.add_argument("--gsm8k", type=Path, help="GSM8K JSONL (question, answer) for stage generate [default: --data].")
    p.add_argument("--gsm8k-n", type=int, default=8, help="Problems generated in stage generate.")
    p.add_argument("--max-new-tokens", type=int, default=256, help="Generation cap in stage generate.")
    p.add_argument("--cuda-arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for exllamav2's JIT build (H100: 9.0).")
    p.add_argument("--max-jobs", default="16", help="MAX_JOBS for exllamav2's JIT build.")
    p.add_argument("--out", type=Path, help="Where results.md and results.json go [default: $OUT, else WORK/results].")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    for stage in ("compare", "dump"):
        if stage in args.stages and args.data is None:
            p.error(f"stage {stage} needs --data")
    if "generate" in args.stages and args.gsm8k is None and args.data is None:
        p.error("stage generate needs --gsm8k or --data")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    # exllamav2 reads these when it is first imported (here or in the converter's subprocess)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", args.cuda_arch)
    os.environ.setdefault("MAX_JOBS", str(args.max_jobs))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(args.work / "torch_extensions"))
    if not torch.cuda.is_available():
        sys.exit(f"no GPU visible to torch {torch.__version__}; this check runs on a CUDA machine")
    device = torch.cuda.get_device_name()
    raw = {"device": device, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    if "build" in args.stages:
        raw["build"] = stage_build(args)
    hf_dir = stage_hf(args) if "hf" in args.stages else args.work / "hf"
    if "convert" in args.stages:
        raw["convert"] = stage_convert(args, hf_dir)
    compare = stage_compare(args, hf_dir) if "compare" in args.stages else []
    dump = stage_dump(args, hf_dir) if "dump" in args.stages else []
    generate = stage_generate(args, hf_dir) if "generate" in args.stages else []
    raw.update(compare=compare, dump=dump, generate=generate)
    table = format_tables(compare, dump, generate, device)
    out = args.out or Path(os.environ.get("OUT") or args.work / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {out}/results.md and results.json\n\n{table}")


if __name__ == "__main__":
    main()
