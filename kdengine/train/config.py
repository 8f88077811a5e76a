"""The training configuration: one dataclass whose fields define every option of `kdengine train`.

Each field carries its flag's group, help, metavar and bounds (`option(...)`); the click command
(`kdengine.train.command`) and the config-file reader are both generated from these fields, so a flag,
its `--config` key and its validation cannot drift apart. A new option is one new field:

    divergence: str = option("fkl", group="loss", help="...", choices=("fkl", "rkl", "jsd"))
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from functools import cache

ONLINE = "online teacher (instead of --store)"
GROUPS = ("inputs and outputs", "optimisation", "loss", ONLINE, "lora", "evaluation, logging, checkpoints", "misc")


def option(
    default=dataclasses.MISSING,
    *,
    group: str,
    help: str,
    metavar: str | None = None,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """A TrainConfig field that is also a command-line option and a config-file key.

    Args:
        default: the value when neither the command line nor a config file sets it; omit it for a
            required option. A bool field is an on flag (`--tail`); one whose default is not False
            (`bool | None` with None = decide automatically) also gets its off switch (`--no-fused-head`).
        group: the `--help` section (one of GROUPS).
        help: the flag's help text; "(default ...)" is appended from `default`.
        choices: the allowed values (for a list field: of each element).
        low, high, low_open, high_open: numeric bounds (open = the bound itself is excluded). Floats
            must also be finite.
    """
    assert group in GROUPS, group
    meta = dict(group=group, help=help, metavar=metavar, choices=choices, low=low, high=high, low_open=low_open,
                high_open=high_open)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(kw_only=True)  # --store is optional (an online run has --teacher), --out is not
class TrainConfig:
    """Everything a run depends on. Saved in every checkpoint; a resume refuses changes to the fields
    that decide the data order and warns about the others."""

    # inputs and outputs
    student: str = option(group="inputs and outputs", metavar="DIR",
                          help="student: a local HF causal-LM directory (see `kdengine make-student`)")
    store: str | None = option(None, group="inputs and outputs", metavar="DIR",
                               help="top-k store directory written by `kdengine dump` (or --teacher and --data "
                                    "for an online teacher)")
    out: str = option(group="inputs and outputs", metavar="DIR",
                      help="run directory: config.yaml, metrics.jsonl, eval.jsonl, checkpoints/, final/")
    resume: bool = option(False, group="inputs and outputs",
                          help="continue from the newest complete checkpoint in --out")

    # optimisation
    steps: int = option(1000, group="optimisation", metavar="N", low=1, help="optimizer steps in the whole run")
    lr: float = option(1e-4, group="optimisation", metavar="X", low=0, low_open=True,
                       help="peak AdamW learning rate")
    min_lr_ratio: float = option(0.1, group="optimisation", metavar="X", low=0, high=1,
                                 help="cosine decay ends at lr * this")
    warmup_steps: int | None = option(None, group="optimisation", metavar="N", low=0,
                                      help="linear warmup steps (default: 5% of --steps)")
    weight_decay: float = option(0.01, group="optimisation", metavar="X", low=0,
                                 help="AdamW weight decay on matrices")
    max_grad_norm: float = option(1.0, group="optimisation", metavar="X", low=0,
                                  help="clip the global gradient norm to this; 0 disables")
    batch_tokens: int = option(8192, group="optimisation", metavar="N", low=1,
                               help="padded tokens (batch size x longest sample) per micro-batch per process")
    grad_accum: int = option(1, group="optimisation", metavar="N", low=1,
                             help="micro-batches per process per optimizer step")
    grad_checkpointing: bool = option(False, group="optimisation",
                                      help="recompute activations in backward to save memory")

    # loss
    alpha: float = option(1.0, group="loss", metavar="X", low=0, high=1,
                          help="loss = alpha * KD + (1 - alpha) * CE on the next token; 1 = pure KD, 0 = plain CE")
    temperature: float = option(1.0, group="loss", metavar="X", low=0, low_open=True, help="KD temperature")
    tail: bool = option(False, group="loss",
                        help="add the teacher's probability mass outside its top-k as one extra KL bucket")
    approx_tempered_tail: bool = option(
        False, group="loss",
        help="with --tail at --temperature != 1 and a store without c_T for that T (dumped without --temperatures "
             "T): treat the tail mass as one token, z_tail = ln(tail) / T, which understates the tempered tail "
             "(several-fold at T = 2); without this flag such a run is refused")
    divergence: str = option("fkl", group="loss", choices=("fkl", "rkl", "jsd"),
                             help="KD divergence over the top-k + tail buckets: fkl = forward KL(teacher || student), "
                                  "rkl = reverse KL(student || teacher) (mode-seeking), jsd = generalized "
                                  "Jensen-Shannon with --beta; on a store or --online-top-k, rkl and jsd need --tail")
    beta: float = option(0.5, group="loss", metavar="X", low=0, high=1, low_open=True, high_open=True,
                         help="jsd mixture weight: m = beta * teacher + (1 - beta) * student")
    loss_impl: str = option("kernel", group="loss", choices=("kernel", "reference"),
                            help="kernel: the compiled sparse KL op; reference: the pure-torch spec (slow; for checks)")
    fused_head: bool | None = option(None, group="loss",
                                     help="compute the output head inside the top-k loss (sparse_kl_linear, chunked "
                                          "over rows), never forming the [N, V] logits; --no-fused-head forms them. "
                                          "Default: fused where it can be, else logits with a one-line note (dense "
                                          "online KD, sampled stores, --loss-impl reference, a head with LoRA "
                                          "dropout or extra logit processing); --fused-head makes that an error")

    # online teacher: runs in the training process under no_grad, on the same batches (replicated on
    # every rank); the corpus gets the tokens and target positions `kdengine dump` would give it
    teacher: str | None = option(None, group=ONLINE, metavar="PATH",
                                 help="teacher run in the training process instead of a store: a local HF model "
                                      "directory or .gguf file sharing the student's tokenizer (needs --data)")
    data: str | None = option(None, group=ONLINE, metavar="FILE",
                              help="corpus JSONL the online teacher runs on (the formats of `kdengine dump --data`)")
    chat: bool = option(False, group=ONLINE,
                        help="render prompt/response and question/answer lines with the chat template (as dump --chat)")
    max_length: int | None = option(None, group=ONLINE, metavar="N", low=2,
                                    help="keep the first N tokens of each sample (as dump --max-length)")
    teacher_device: str | None = option(None, group=ONLINE, metavar="DEV",
                                        help="device of the teacher: cpu, cuda, cuda:N (default: the student's)")
    teacher_dtype: str | None = option(None, group=ONLINE, choices=("fp32", "bf16"),
                                       help="teacher weights and compute (default: bf16 on CUDA, fp32 on CPU)")
    online_top_k: int = option(0, group=ONLINE, metavar="K", low=0,
                               help="0: dense KD, the full-vocabulary KL to the teacher; K: the teacher's top-K "
                                    "(+ --tail) taken on the fly into the sparse KL kernel, as a store would hold it")
    hidden_weight: float = option(0.0, group=ONLINE, metavar="W", low=0,
                                  help="feature KD: add W times the hidden-state loss; 0 disables")
    hidden_loss: str = option("cosine", group=ONLINE, choices=("mse", "cosine"),
                              help="feature KD loss per row and layer pair")
    hidden_layers: str | None = option(None, group=ONLINE, metavar="S:T,...",
                                       help="feature KD pairs, student layer:teacher layer (0-based decoder layers), "
                                            "e.g. '0:0,7:15,14:29'; a learned linear map per pair when the widths "
                                            "differ (kept in checkpoints, not in the exported student). Default: the "
                                            "layer map make-student recorded, else uniform")

    # lora
    lora_rank: int = option(0, group="lora", metavar="R", low=0,
                            help="LoRA adapter rank (peft); 0 = full fine-tuning. Checkpoints then hold the adapter "
                                 "only; final/ is the merged model and final/adapter/ the adapter")
    lora_alpha: float | None = option(None, group="lora", metavar="X", low=0, low_open=True,
                                      help="LoRA scaling numerator (scale = alpha / rank) (default: 2 x --lora-rank)")
    lora_dropout: float = option(0.0, group="lora", metavar="P", low=0, high=1, high_open=True,
                                 help="dropout on the LoRA branch's input")
    lora_targets: list[str] = option([], group="lora", metavar="NAMES",
                                     help="module names that get adapters, e.g. q_proj,v_proj (default: every "
                                          "nn.Linear in the decoder layers: the attention and MLP projections)")

    # evaluation, logging, checkpoints
    eval_every: int = option(200, group="evaluation, logging, checkpoints", metavar="N", low=0,
                             help="evaluate on the held-out slice every N steps, before the first and after the "
                                  "last; 0 disables")
    eval_fraction: float = option(0.02, group="evaluation, logging, checkpoints", metavar="X", low=0, high=1,
                                  low_open=True, high_open=True,
                                  help="fraction of store samples held out of training for evaluation, chosen by "
                                       "--seed (at least one sample)")
    save_every: int = option(500, group="evaluation, logging, checkpoints", metavar="N", low=0,
                             help="checkpoint every N steps; one is always written at the end")
    keep_checkpoints: int = option(2, group="evaluation, logging, checkpoints", metavar="N", low=0,
                                   help="how many of the newest checkpoints to keep; 0 keeps all")
    log_every: int = option(10, group="evaluation, logging, checkpoints", metavar="N", low=1,
                            help="log every N steps")
    report_to: list[str] = option(["none"], group="evaluation, logging, checkpoints", metavar="SINKS",
                                  choices=("none", "tensorboard", "wandb"),
                                  help="also send every metrics.jsonl / eval.jsonl value to: none, tensorboard "
                                       "(OUT/tensorboard/), wandb (OUT/wandb/; WANDB_MODE=offline works without "
                                       "network); several allowed. OUT/curves.png is drawn at the end of every run")
    stop_after: int | None = option(None, group="evaluation, logging, checkpoints", metavar="STEP", low=1,
                                    help="stop after this global step with a checkpoint, keeping the schedule of "
                                         "--steps (for jobs with a wall-time limit; continue with --resume)")

    # misc
    seed: int = option(0, group="misc", metavar="N", help="seed for shuffling, the held-out split and init")
    workers: int = option(2, group="misc", metavar="N", low=0,
                          help="DataLoader worker processes per training process for store decoding")
    fsdp: bool = option(False, group="misc",
                        help="shard the student with FSDP (fully_shard per decoder layer) instead of DDP")

    @property
    def warmup(self) -> int:
        """Warmup steps: the explicit value, else 5% of the run."""
        return self.warmup_steps if self.warmup_steps is not None else round(0.05 * self.steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OptionSpec:
    """One TrainConfig field as an option: its name, value type and `option()` metadata."""

    name: str
    kind: type  # bool, int, float, str or list (of str)
    optional: bool  # None is a valid value
    required: bool
    default: object
    meta: dict

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@cache
def option_specs() -> tuple[OptionSpec, ...]:
    """Every TrainConfig field as an OptionSpec, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        kind = typing.get_origin(args[0] if optional else hint) or (args[0] if optional else hint)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        specs.append(OptionSpec(f.name, kind, optional, default is dataclasses.MISSING, default, dict(f.metadata)))
    return tuple(specs)


def spec_of(name: str) -> OptionSpec | None:
    return {s.name: s for s in option_specs()}.get(name)


def coerce(spec: OptionSpec, value):
    """`value` (from a config file or JSON) as the field's type.

    Raises:
        ValueError: wrong type or out-of-range value; the message names the valid values.
    """
    if value is None:
        if spec.optional:
            return None
        raise ValueError(f"needs {_type_name(spec)}, got null")
    if spec.kind is bool:
        ok = isinstance(value, bool)
    elif spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif spec.kind is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"needs {_type_name(spec)}, got {type(value).__name__} {value!r}")
    problem = check_value(spec, value)
    if problem:
        raise ValueError(problem)
    return value


def check_value(spec: OptionSpec, value) -> str | None:
    """Why `value` is out of the field's range or choices, or None if it is fine."""
    if value is None:
        return None
    m = spec.meta
    if m["choices"] is not None:
        bad = [v for v in (value if spec.kind is list else [value]) if v not in m["choices"]]
        if bad:
            return f"got {bad[0]!r}; valid choices: {', '.join(map(str, m['choices']))}"
    if spec.kind in (int, float):
        if spec.kind is float and not math.isfinite(value):
            return f"must be a finite number{_range_text(m)}, got {value}"
        too_low = m["low"] is not None and (value <= m["low"] if m["low_open"] else value < m["low"])
        too_high = m["high"] is not None and (value >= m["high"] if m["high_open"] else value > m["high"])
        if too_low or too_high:
            return f"must be{_range_text(m)}, got {value}"
    return None


def cross_field_problems(cfg: TrainConfig) -> list[str]:
    """Checks that involve more than one field (each field's own range is checked by `check_value`)."""
    online = cfg.teacher is not None
    online_only = (cfg.data, cfg.chat, cfg.max_length, cfg.teacher_device, cfg.teacher_dtype, cfg.online_top_k,
                   cfg.hidden_weight, cfg.hidden_layers)
    checks = [
        (cfg.warmup_steps is None or cfg.warmup_steps <= cfg.steps,
         f"--warmup-steps must be in [0, --steps={cfg.steps}], got {cfg.warmup_steps}"),
        (cfg.divergence == "fkl" or cfg.tail or (online and cfg.online_top_k == 0),
         f"--divergence {cfg.divergence} needs --tail: without the tail bucket the student's mass outside the "
         "teacher's top-k is invisible to it (dense online KD, --online-top-k 0, needs no tail)"),
        (cfg.store is None or not online, "--teacher and --store exclude each other: train against a store "
         "(--store DIR) or an online teacher (--teacher PATH --data FILE), not both"),
        (cfg.store is not None or online, "give --store DIR (a dumped top-k store) or --teacher PATH --data FILE "
         "(an online teacher)"),
        (not online or cfg.data is not None, "--teacher needs --data FILE, the corpus the teacher runs on"),
        (online or not any(online_only), "--data, --chat, --max-length, --teacher-*, --online-top-k and --hidden-* "
         "need --teacher (online); a store already holds its tokens and targets"),
    ]
    return [msg for ok, msg in checks if not ok]


def _range_text(m: dict) -> str:
    low, high = m["low"], m["high"]
    if low is not None and high is not None:
        return f" in {'(' if m['low_open'] else '['}{low:g}, {high:g}{')' if m['high_open'] else ']'}"
    if low is not None:
        return f" {'>' if m['low_open'] else '>='} {low:g}"
    if high is not None:
        return f" {'<' if m['high_open'] else '<='} {high:g}"
    return ""


def _type_name(spec: OptionSpec) -> str:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of strings"}[spec.kind]
    return name + (" or null" if spec.optional else "")


def write_config_yaml(path, cfg: TrainConfig) -> None:
    """Writes the resolved config as YAML (atomically); `kdengine train --config PATH` repeats the run."""
    from kdengine.config_file import write_config_file

    write_config_file(path, cfg.to_dict(), header=(
        "kdengine train: the resolved options of this run (command line > --config file > defaults).\n"
        "Repeat it with: kdengine train --config THIS_FILE --out NEW_DIR"))
