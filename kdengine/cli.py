"""The `kdengine` command line. Each command parses its options and calls one library function;
heavy imports happen inside the command so that `kdengine --help` stays fast."""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdengine")
def cli():
    """White-box logit distillation: dump a teacher's top-k distributions, train a student
    against them with a sparse KL kernel, and score models on GSM8K."""


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
