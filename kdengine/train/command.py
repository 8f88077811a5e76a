"""`kdengine train` as a click command, generated from TrainConfig's fields.

`scripts/train.py` (the torchrun entry point) runs this same command; `kdengine.train.main(argv)` parses
with it too. Values come from, in order of precedence: the command line, `--config FILE`, the field's
default.
"""
from __future__ import annotations

import click

from kdengine.train.config import GROUPS, OptionSpec, TrainConfig, check_value, coerce, cross_field_problems, option_specs

EXAMPLES = """\b
Examples:
  python scripts/train.py --student runs/student --store runs/store --out runs/kd --steps 2000
  torchrun --nproc_per_node=8 scripts/train.py --student S --store D --out O --batch-tokens 16384
  torchrun --nproc_per_node=8 scripts/train.py ... --fsdp        # shard a student that does not fit one GPU
  python scripts/train.py --student S --store D --out O --resume  # continue from the newest checkpoint
  kdengine train --config run.yaml --steps 500                    # a config file; flags override it
  kdengine train --student S --teacher T --data corpus.jsonl --out O   # online dense KD, no store
  kdengine train --student S --teacher T --data C --out O --online-top-k 64 --hidden-weight 1
"""

_OTHER_GROUP = "misc"


class _GroupedOption(click.Option):
    def __init__(self, *args, group: str = _OTHER_GROUP, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group


class _GroupedCommand(click.Command):
    """Lists options under their TrainConfig group headings in `--help`."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list] = {group: [] for group in GROUPS}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group", _OTHER_GROUP), []).append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title.capitalize()):
                    formatter.write_dl(records)


def _check(spec: OptionSpec):
    def callback(ctx, param, value):
        if spec.kind is list:
            value = [item.strip() for v in value for item in v.split(",") if item.strip()] or None
            if value is None:
                return None
        problem = check_value(spec, value)
        if problem:
            raise click.BadParameter(problem)
        return value

    return callback


def _click_option(spec: OptionSpec) -> click.Option:
    m = spec.meta
    text = m["help"]
    kwargs: dict = dict(group=m["group"], callback=_check(spec), default=None)
    names = [spec.flag, spec.name]
    if spec.kind is bool and spec.default is False:
        kwargs.update(is_flag=True, flag_value=True)
    elif spec.kind is bool:  # on by default or decided automatically: it also needs an off switch
        names[0] = f"{spec.flag}/--no-{spec.flag.removeprefix('--')}"
        kwargs.update(is_flag=True)
    else:
        if m["choices"] is not None and spec.kind is not list:  # a list's items are checked after comma-splitting
            kwargs["type"] = click.Choice([str(c) for c in m["choices"]])
        else:
            kwargs["type"] = {int: click.INT, float: click.FLOAT, str: click.STRING, list: click.STRING}[spec.kind]
        kwargs["metavar"] = m["metavar"] or ("NAME" if spec.kind in (str, list) and m["choices"] is None else None)
        if spec.kind is list:
            kwargs["multiple"] = True
            text += " (repeat the flag or separate with commas)"
        if spec.required:
            text += " [required]"
        elif spec.default is not None and "(default" not in text:
            shown = ",".join(spec.default) if spec.kind is list else spec.default
            text += f" (default {shown})"
    return _GroupedOption(names, help=text, **kwargs)


def _config_option() -> click.Option:
    return _GroupedOption(
        ["--config", "config_file"], group="inputs and outputs", metavar="FILE", default=None,
        type=click.Path(dir_okay=False),
        help="YAML or JSON file of options (keys as the flags: `batch_tokens: 4096` or `batch-tokens: 4096`); "
             "flags on the command line override it. Every run writes its resolved config to OUT/config.yaml, "
             "so `--config OUT/config.yaml` repeats it.")


def resolve_config(ctx: click.Context, params: dict) -> TrainConfig:
    """The TrainConfig from the parsed command line and the `--config` file it may name.

    Raises:
        click.UsageError / click.BadParameter: a bad config file, a missing required option, or a
            cross-field conflict.
    """
    from kdengine.config_file import ConfigFileError, read_config_file

    specs = {s.name: s for s in option_specs()}
    from_file: dict = {}
    if params.get("config_file"):
        try:
            from_file = read_config_file(params["config_file"], specs, lambda n, v: coerce(specs[n], v))
        except ConfigFileError as exc:
            raise click.UsageError(str(exc)) from None
    values = {}
    for name, spec in specs.items():
        if params.get(name) is not None:
            values[name] = params[name]
        elif name in from_file:
            values[name] = from_file[name]
        elif spec.required:
            raise click.UsageError(f"missing option {spec.flag} (or `{name}:` in a --config file)")
        else:
            values[name] = spec.default
    cfg = TrainConfig(**values)
    for problem in cross_field_problems(cfg):
        raise click.UsageError(problem)
    return cfg


def _train(**params):
    """Train a student against a teacher's top-k store with the sparse KL loss (--store), or against a
    teacher running in the training process (--teacher and --data: dense or top-k KD, optional feature
    KD; the teacher is replicated on every rank). Runs alone or under torchrun (DDP, or FSDP with --fsdp);
    CUDA when available, else CPU with gloo."""
    from kdengine.train import TrainError, train

    cfg = resolve_config(click.get_current_context(), params)
    try:
        train(cfg)
    except TrainError as exc:
        raise click.ClickException(str(exc)) from None


def build_command() -> click.Command:
    params = [_config_option(), *(_click_option(spec) for spec in option_specs())]
    return _GroupedCommand(
        "train", callback=_train, params=params, help=_train.__doc__, epilog=EXAMPLES,
        context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 100, "max_content_width": 100},
    )


train_command = build_command()


def parse_config(argv: list[str] | None, prog: str = "scripts/train.py") -> TrainConfig:
    """Parses command-line arguments as `kdengine train` does, without running.

    Raises:
        SystemExit: --help (code 0) or bad arguments (code 2, the message printed to stderr).
    """
    try:
        ctx = train_command.make_context(prog, list(argv or []))
        with ctx:
            return resolve_config(ctx, ctx.params)
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
