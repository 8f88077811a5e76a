"""The trainer's pure parts: flags, LR schedule, batch planning and rank split, checkpoint files."""
import math

import pytest
import torch

from kdengine.train.checkpoint import (
    TrainState,
    commit_checkpoint,
    config_drift,
    data_order_changes,
    newest_checkpoint,
    prepare_staging,
    read_train_state,
    remove_partial_checkpoints,
)
from kdengine.train.state_files import load_state, save_state
from kdengine.train.command import parse_config
from kdengine.train.config import TrainConfig
from kdengine.train.data import BatchSchedule, DataPosition, plan_batches, split_heldout
from kdengine.train.guard import check_student_matches_store
from kdengine.train.errors import TrainError
from kdengine.train.optim import lr_factor

REQUIRED = ["--student", "s", "--store", "d", "--out", "o"]


def test_pinned_flags_parse():
    cfg = parse_config(REQUIRED + "--steps 7 --lr 3e-4 --batch-tokens 512 --alpha 0.5 --temperature 2 --tail "
                                  "--eval-every 3 --save-every 4 --log-every 2 --seed 9 --resume --fsdp".split())
    assert (cfg.steps, cfg.lr, cfg.batch_tokens, cfg.alpha, cfg.temperature) == (7, 3e-4, 512, 0.5, 2.0)
    assert (cfg.tail, cfg.eval_every, cfg.save_every, cfg.log_every, cfg.seed) == (True, 3, 4, 2, 9)
    assert cfg.resume and cfg.fsdp
    assert TrainConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("flags, message", [
    ("--alpha 1.5", "Invalid value for '--alpha': must be in [0, 1], got 1.5"),
    ("--steps 0", "Invalid value for '--steps': must be >= 1, got 0"),
    ("--warmup-steps 20 --steps 10", "--warmup-steps must be in [0, --steps=10], got 20"),
    ("--eval-fraction 1", "Invalid value for '--eval-fraction': must be in (0, 1), got 1.0"),
    ("--weight-decay -5", "Invalid value for '--weight-decay': must be >= 0, got -5.0"),
    ("--max-grad-norm -1", "Invalid value for '--max-grad-norm': must be >= 0, got -1.0"),
    ("--temperature inf", "Invalid value for '--temperature': must be a finite number > 0, got inf"),
    ("--lr nan", "Invalid value for '--lr': must be a finite number > 0, got nan"),
    ("--loss-impl fast", "Invalid value for '--loss-impl': 'fast' is not one of 'kernel', 'reference'"),
])
def test_bad_flags_are_rejected(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(REQUIRED + flags.split())
    assert message in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert math.isclose(f[20], 0.1) and math.isclose(f[12], 0.55)
    assert lr_factor(0, warmup=0, total=10, min_ratio=0.0) == 1.0


def test_heldout_split_is_seeded_and_disjoint():
    train, held = split_heldout(200, 0.05, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == list(range(200))
    assert split_heldout(200, 0.05, seed=3) == (train, held)
    assert split_heldout(200, 0.05, seed=4)[1] != held
    assert len(split_heldout(10, 0.01, seed=0)[1]) == 1


def test_batches_respect_the_token_budget_and_cover_every_sample():
    lengths = [(i * 37) % 61 + 3 for i in range(300)]
    ids = list(range(0, 300, 2))
    batches = plan_batches(ids, lengths, 256, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == ids
    assert all(len(b) * max(lengths[i] for i in b) <= 256 for b in batches)
    assert plan_batches(ids, lengths, 256, seed=1, epoch=0) == batches
    assert plan_batches(ids, lengths, 256, seed=1, epoch=1) != batches
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(lengths[i] for i in ids)  # length sorting keeps padding small
    assert plan_batches([0, 1], [500, 4], 256, seed=0) in ([[1], [0]], [[0], [1]])  # too long: alone


def test_ranks_split_each_step_like_grad_accumulation():
    lengths = [8] * 50
    sched = BatchSchedule(list(range(50)), lengths, 32, seed=0)  # 4 samples a batch -> 13 a epoch
    one = list(sched.rank_positions(DataPosition(0, 0), steps=5, world=1, accum=4, rank=0))
    two = [list(sched.rank_positions(DataPosition(0, 0), steps=5, world=2, accum=2, rank=r)) for r in range(2)]
    assert sorted(one, key=lambda p: (p.epoch, p.index)) == one
    assert sorted(two[0] + two[1], key=lambda p: (p.epoch, p.index)) == one
    assert not set(two[0]) & set(two[1])
    assert one[13] == DataPosition(1, 0)  # the stream runs on into the next epoch
    _, after = sched.advance(DataPosition(0, 0), 20)
    assert after == DataPosition(1, 7)
    assert one[19] == DataPosition(1, 6)


def test_guard_messages():
    ok = dict(student_dir="S", student_fingerprint="a" * 64, student_vocab=100, store_dir="D",
              store_fingerprint="a" * 64, store_vocab=90)
    check_student_matches_store(**ok)
    with pytest.raises(TrainError, match="tokenizer mismatch: student S has tokenizer fingerprint bbbb"):
        check_student_matches_store(**{**ok, "student_fingerprint": "b" * 64})
    with pytest.raises(TrainError, match="student S has 80 output rows, but store D holds teacher ids up to 89"):
        check_student_matches_store(**{**ok, "student_vocab": 80})


def _save(out, step, keep=2):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    tmp = prepare_staging(out, step)
    save_state(tmp, "optimizer", opt.state_dict())
    state = TrainState(step=step, epoch=0, batch_index=step, world=1, store_samples=9, store_identity="ab",
                       sharded=False, config={"lr": 1.0})
    return commit_checkpoint(out, tmp, state, keep=keep)


def test_checkpoints_are_atomic_newest_wins_and_old_ones_are_pruned(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    for step in (5, 10, 15):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010", "step-00000015"]
    (root / ".tmp-step-00000020").mkdir()  # a save that was killed midway
    (root / "step-00000030").mkdir()  # no trainer_state.json: not complete
    assert newest_checkpoint(tmp_path) == root / "step-00000015"
    assert remove_partial_checkpoints(tmp_path) == [root / ".tmp-step-00000020"]
    state = read_train_state(root / "step-00000015")
    assert (state.step, state.batch_index, state.config) == (15, 15, {"lr": 1.0})
    assert load_state(root / "step-00000015", "optimizer")["state"][0]["step"].item() == 1


def test_state_files_round_trip_without_pickle(tmp_path):
    import random

    obj = {"rng": random.getstate(), "t": torch.arange(4.0), "nested": [{"a": None, "b": (1, 2.5, "x")}],
           "by_index": {0: torch.ones(2), 3: True}}
    save_state(tmp_path, "s", obj)
    back = load_state(tmp_path, "s")
    assert back["rng"] == obj["rng"] and back["nested"] == obj["nested"] and back["by_index"][3] is True
    assert torch.equal(back["t"], obj["t"]) and torch.equal(back["by_index"][0], obj["by_index"][0])
    assert b"pickle" not in (tmp_path / "s.json").read_bytes()


def test_an_old_pickle_format_checkpoint_is_refused(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 3, "epoch": 0}')
    with pytest.raises(TrainError, match="checkpoint format 1, this kdengine reads format 2"):
        read_train_state(tmp_path)


def test_data_order_fields_are_refused_not_drift():
    saved = {"seed": 0, "batch_tokens": 256, "eval_fraction": 0.02, "lr": 1.0}
    now = {"seed": 1, "batch_tokens": 256, "eval_fraction": 0.1, "lr": 2.0}
    assert data_order_changes(saved, now) == ["--seed: checkpoint 0, now 1", "--eval-fraction: checkpoint 0.02, now 0.1"]
    assert config_drift(saved, now) == ["lr: checkpoint 1.0 -> now 2.0"]


def test_config_drift_ignores_cadence_fields():
    assert config_drift({"lr": 1, "log_every": 1}, {"lr": 1, "log_every": 5}) == []
    assert config_drift({"lr": 1, "alpha": 1.0}, {"lr": 2, "alpha": 1.0}) == ["lr: checkpoint 1 -> now 2"]
