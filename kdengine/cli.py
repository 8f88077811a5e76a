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
