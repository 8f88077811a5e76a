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


@cli.group("eval")
def eval_group():
    """Score models and their outputs on benchmarks."""


@eval_group.command("gsm8k")
@click.option("--responses", type=click.Path(exists=True, dir_okay=False),
              help="Score this JSONL of existing outputs (fields: question, answer with '#### N', response); no model.")
@click.option("--model", metavar="PATH", help="Generate answers with this model: a local from_pretrained directory or .gguf file.")
@click.option("--backend", default="hf", show_default=True,
              help="Teacher backend that loads --model: hf (transformers: a model directory or a .gguf file) "
                   "or exl2 (ExLlamaV2: an EXL2 directory, on all visible GPUs).")
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
@click.pass_context
def eval_gsm8k(ctx, responses, model, log_dir, **model_options):
    """Score GSM8K answers with the ordered extraction cascade (boxed, first line, answer phrase,
    last number) and write reports to a log directory.

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
            log_dir, report = evaluate_responses(responses, log_dir)
        else:
            if model_options["data"] is None:
                raise click.UsageError("--model needs --data FILE.jsonl (GSM8K problems to answer)")
            log_dir, report = evaluate_model(model, log_dir=log_dir, **model_options)
    except EvalError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"GSM8K accuracy {report['accuracy']:.2%} ({report['correct']}/{report['n']}); "
               f"{report['rules']['none']['count']} for manual review; reports in {log_dir}/")


def main():
    cli()


@cli.command(
    "train",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_command(args):
    """Train a student on a teacher's top-k store (sparse KL). Same flags and code path as
    scripts/train.py; `kdengine train --help` lists them. Under torchrun, use scripts/train.py."""
    from kdengine.train import TrainError, main as train_main

    try:
        train_main(list(args), prog="kdengine train")
    except TrainError as exc:
        raise click.ClickException(str(exc)) from None


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
