"""--report-to tensorboard,wandb gets every metrics.jsonl / eval.jsonl value; curves.png after every run."""
import pytest
from conftest import read_records, train_args

from kdengine.train import main


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
