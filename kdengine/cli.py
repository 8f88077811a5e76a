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
