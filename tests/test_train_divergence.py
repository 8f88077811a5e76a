"""The trainer's --divergence/--beta: KD and CE parts from the loss's own pass, the objective recorded in
metrics and checkpoints, and a resume that refuses to change it."""
import json

import pytest

from kdengine.train import TrainError, main
from conftest import read_records as _records
from conftest import train_args as _args


def test_divergence_is_logged_checkpointed_and_pinned_on_resume(store_dir, student_dir, tmp_path):
    extra = ("--steps", 3, "--alpha", 0.5, "--tail", "--approx-tempered-tail", "--temperature", 2.0, "--divergence", "jsd",
             "--beta", 0.3)
    main(_args(student_dir, store_dir, tmp_path, *extra))
    records = _records(tmp_path)
    for r in records:
        assert r["divergence"] == "jsd" and r["beta"] == 0.3
        assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"], rel=1e-5)
        assert r["kd"] > 0 and r["ce"] > 0
    state = json.loads(next((tmp_path / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())
    assert state["config"]["divergence"] == "jsd" and state["config"]["beta"] == 0.3
    resumed = [*extra[:1], 4, *extra[2:]]
    with pytest.raises(TrainError, match=r"trained with --divergence jsd, this resume asks for rkl; resume with "
                                         r"--divergence jsd or start a new --out"):
        main(_args(student_dir, store_dir, tmp_path, *resumed[:-4], "--divergence", "rkl", "--resume"))
    with pytest.raises(TrainError, match=r"trained with --beta 0.3, this resume asks for 0.5"):
        main(_args(student_dir, store_dir, tmp_path, *resumed[:-2], "--resume"))


def test_reverse_divergences_need_the_tail(student_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--student", str(student_dir), "--store", str(tmp_path), "--out", str(tmp_path / "o"),
              "--divergence", "rkl"])
    assert "--divergence rkl needs --tail" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--student", str(student_dir), "--store", str(tmp_path), "--out", str(tmp_path / "o"),
              "--divergence", "jsd", "--tail", "--beta", "1"])
    assert "Invalid value for '--beta': must be in (0, 1), got 1.0" in capsys.readouterr().err
