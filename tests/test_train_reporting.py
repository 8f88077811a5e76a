"""--report-to tensorboard,wandb gets every metrics.jsonl / eval.jsonl value; curves.png after every run;
the start-up line says how fast one worker decodes the store, and a window that waits for data says so."""
import re

import pytest
from conftest import read_records, train_args

from kdengine.train import main
from kdengine.train.loop import data_wait_warning


def test_tensorboard_and_offline_wandb_get_every_logged_value(store_dir, student_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    main(train_args(student_dir, store_dir, out, "--steps", 3, "--eval-every", 3, "--report-to", "tensorboard",
                    "--report-to", "wandb"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for kind, name in (("train", "metrics"), ("eval", "eval")):
        records = read_records(out, name)
        for key, value in records[0].items():
            # settings, not metrics ("divergence", "fused_head"): the sinks take numbers only, not str or bool
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            got = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
            assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((out / "wandb").iterdir())
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_to_rejects_unknown_sinks(capsys):
    from kdengine.train.command import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--student", "s", "--store", "d", "--out", "o", "--report-to", "tensorboard,mlflow"])
    assert "Invalid value for '--report-to': got 'mlflow'; valid choices: none, tensorboard, wandb" in \
        capsys.readouterr().err


def test_start_up_line_gives_the_workers_and_what_one_decodes(store_dir, student_dir, tmp_path, capsys):
    main(train_args(student_dir, store_dir, tmp_path / "run", "--steps", 2))
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    match = re.fullmatch(r"data: 0 decode worker\(s\) \(--workers\); one decodes ~([\d,]+) target positions/s on "
                         r"this machine \(measured now\), so they feed up to ~([\d,]+)/s; time a step waits shows as "
                         r"data_wait in the log", line)
    assert match, line
    rate, feed = (int(g.replace(",", "")) for g in match.groups())
    assert rate > 1000 and feed == rate  # --workers 0: the main process decodes, as one worker would


def _window(data_wait):
    return {"step": 40, "data_wait": data_wait, "targets_per_s": 123456.0}


def test_data_wait_over_one_percent_warns_with_what_to_do():
    assert data_wait_warning(_window(0.01), 80_000.0, 2, "sqrt_ac") is None
    assert data_wait_warning(_window(0.5), None, 2, None) is None  # an online teacher: nothing to decode
    warning = data_wait_warning(_window(0.034), 80_000.0, 2, "sqrt_ac")
    assert warning.startswith("warning: step 40: steps waited for data 3.4% of the time (consuming 123,456 target "
                              "positions/s); each decode worker adds ~80,000/s: raise --workers (now 2); or store "
                              "with --codec sqrt")
    assert "--codec sqrt" not in data_wait_warning(_window(0.034), 300_000.0, 2, "sqrt")
