"""`kdengine train --config FILE`: the same TrainConfig as the flags, command line over file, and
FILE:LINE errors for unknown keys, wrong types and bad values."""
import pytest
import yaml

from kdengine.train.command import parse_config
from kdengine.train.config import TrainConfig, option_specs, write_config_yaml

FLAGS = ["--student", "s", "--store", "d", "--out", "o", "--steps", "7", "--lr", "3e-4", "--tail",
         "--warmup-steps", "2", "--loss-impl", "reference", "--temperature", "2"]


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_file_gives_the_same_config_as_the_flags(tmp_path):
    path = _write(tmp_path, "student: s\nstore: d\nout: o\nsteps: 7\nlr: 3e-4\ntail: true\n"
                            "warmup-steps: 2\nloss_impl: reference\ntemperature: 2\n")
    assert parse_config(["--config", str(path)]) == parse_config(FLAGS)
    json_path = _write(tmp_path, '{"student": "s", "store": "d", "out": "o", "steps": 7, "lr": 0.0003, "tail": true,'
                                 ' "warmup_steps": 2, "loss_impl": "reference", "temperature": 2}', "run.json")
    assert parse_config(["--config", str(json_path)]) == parse_config(FLAGS)


def test_command_line_overrides_the_file(tmp_path):
    path = _write(tmp_path, "student: s\nstore: d\nout: o\nsteps: 7\nlr: 0.1\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.5", "--out", "other"])
    assert (cfg.steps, cfg.lr, cfg.out) == (7, 0.5, "other")


def test_written_config_reads_back_to_the_same_config(tmp_path):
    cfg = parse_config(FLAGS)
    write_config_yaml(tmp_path / "config.yaml", cfg)
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert set(yaml.safe_load((tmp_path / "config.yaml").read_text())) == {s.name for s in option_specs()}
    assert TrainConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("text, line, message", [
    ("student: s\nsteps: 5\nbatch_tokenz: 10\n", 3,
     "unknown key 'batch_tokenz'; did you mean 'batch_tokens'? valid keys: student, store, out, resume, steps"),
    ("student: s\n\nsteps: five\n", 3, "steps: needs an integer, got str 'five'"),
    ("steps: 2.5\n", 1, "steps: needs an integer, got float 2.5"),
    ("tail: 1\n", 1, "tail: needs true or false, got int 1"),
    ("store: d\nloss_impl: fast\n", 2, "loss_impl: got 'fast'; valid choices: kernel, reference"),
    ("alpha: 1.5\n", 1, "alpha: must be in [0, 1], got 1.5"),
    ("temperature: .inf\n", 1, "temperature: must be a finite number > 0, got inf"),
    ("weight_decay: -5\n", 1, "weight_decay: must be >= 0, got -5.0"),
    ("steps: 3\nlr: 0.1\nsteps: 4\n", 3, "'steps' is set twice (first on line 1)"),
    ("steps: [1\n", 2, "not valid YAML/JSON"),
])
def test_bad_config_files_name_file_and_line(tmp_path, capsys, text, line, message):
    path = _write(tmp_path, text)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", str(path), "--student", "s", "--store", "d", "--out", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}: " in err and message in err, err


def test_a_config_that_is_not_a_mapping_and_a_missing_required_key(tmp_path, capsys):
    path = _write(tmp_path, "- steps\n- 3\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert f"{path}:1: a config file is a mapping of option names to values" in capsys.readouterr().err
    path = _write(tmp_path, "student: s\nstore: d\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert "missing option --out (or `out:` in a --config file)" in capsys.readouterr().err


def test_fused_head_is_automatic_unless_switched_on_or_off(tmp_path):
    required = ["--student", "s", "--store", "d", "--out", "o"]
    assert [parse_config([*required, *flag]).fused_head for flag in ([], ["--fused-head"], ["--no-fused-head"])] \
        == [None, True, False]
    path = _write(tmp_path, "fused-head: false\n")
    assert parse_config(["--config", str(path), *required]).fused_head is False
    assert parse_config(["--config", str(path), *required, "--fused-head"]).fused_head is True
