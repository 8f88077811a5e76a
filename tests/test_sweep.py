"""`kdengine sweep`: a 2x2x2 grid on tiny models that skips finished cells and resumes a killed one, and
its statistics against scipy on fixed numbers."""
import json

import pytest
import yaml
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.evals.gsm8k import EvalError
from kdengine.evals.sweep import Cell, cells, load_config, summarize, train_cell


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_model_dir):
    from kdengine.demo.problems import split_problems
    from kdengine.dump import DumpConfig, dump
    from kdengine.train.student import make_student

    root = tmp_path_factory.mktemp("sweep")
    train, heldout = split_problems(12, 3, seed=0)
    for name, problems in (("train", train), ("heldout", heldout)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p.as_record(str(i))) + "\n"
                                                    for i, p in enumerate(problems)))
    dump(DumpConfig(teacher=str(tiny_model_dir), data=str(root / "train.jsonl"), out=str(root / "store"), top_k=8,
                    batch_size=4, chat=True, progress=False))
    make_student(str(tiny_model_dir), layers=1, layer_map="first", out=str(root / "student"))
    return root


def _config(root, tiny_model_dir, out):
    cfg = {"student": str(root / "student"), "store": str(root / "store"), "teacher": str(tiny_model_dir),
           "heldout": str(root / "heldout.jsonl"), "out": str(out), "seeds": [0, 1],
           "grid": {"method": ["ce", "fkl"], "temperature": [1.0, 2.0]}, "baseline": {"method": "ce", "temperature": 1.0},
           "train": {"steps": 3, "batch_tokens": 256, "lr": 1e-3, "eval_fraction": 0.2, "log_every": 1},
           "gsm8k": {"limit": 2, "max_new_tokens": 4, "batch_size": 2}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sweep_grid_skips_finished_cells_and_resumes_a_killed_one(tiny_setup, tiny_model_dir, tmp_path, capsys):
    path = _config(tiny_setup, tiny_model_dir, tmp_path / "sweep")
    cfg = load_config(path)
    grid = cells(cfg)
    assert len(grid) == 8 and len({c.ident for c in grid}) == 8
    killed = grid[3]
    train_cell(cfg, killed, extra=["--stop-after", "2"], progress=False)  # a run cut off after step 2
    run = tmp_path / "sweep" / "cells" / killed.ident / "run"
    assert not (run / "final").exists() and any((run / "checkpoints").iterdir())
    capsys.readouterr()

    result = CliRunner().invoke(cli, ["sweep", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "8 cells (0 finished before this run)" in result.output
    assert f"resumed from {run / 'checkpoints'}" in result.output  # the trainer's own message
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    rows = [json.loads((tmp_path / "sweep" / "cells" / c.ident / "result.json").read_text()) for c in grid]
    assert {(r["method"], r["temperature"], r["seed"]) for r in rows} == {
        (m, t, s) for m in ("ce", "fkl") for t in (1.0, 2.0) for s in (0, 1)}
    for c, r in zip(grid, rows):
        assert r["steps"] == 3 and r["gsm8k_n"] == 2 and r["kl_to_teacher"] > 0
        assert not (tmp_path / "sweep" / "cells" / c.ident / "run" / "checkpoints").exists()
        assert (tmp_path / "sweep" / "cells" / c.ident / "gsm8k" / "report.json").is_file()
    for name in ("cells.csv", "summary.csv", "summary.md"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    for name in ("metrics.png", "gain.png", "pareto.png"):
        assert (tmp_path / "sweep" / name).read_bytes()[:4] == b"\x89PNG"
    assert "`method=ce,temperature=1.0` | " in (tmp_path / "sweep" / "summary.md").read_text()

    # a finished cell is skipped; one whose result was lost is evaluated again from its final model
    lost = tmp_path / "sweep" / "cells" / grid[5].ident / "result.json"
    lost.unlink()
    again = CliRunner().invoke(cli, ["sweep", "--config", str(path)])
    assert again.exit_code == 0, again.output
    assert "8 cells (7 finished before this run)" in again.output
    assert json.loads(lost.read_text())["kl_to_teacher"] == pytest.approx(rows[5]["kl_to_teacher"])


def test_statistics_match_scipy_on_fixed_numbers():
    from scipy import stats

    base = [0.50, 0.55, 0.52, 0.58]
    kd = [0.40, 0.47, 0.41, 0.50]
    rows = [{"setting": "method=ce", "method": "ce", "seed": s, "kl_to_teacher": b, "top1_agreement": 1 - b,
             "perplexity": 3 + b, "gsm8k_accuracy": 0.1} for s, b in enumerate(base)]
    rows += [{"setting": "method=fkl", "method": "fkl", "seed": s, "kl_to_teacher": k, "top1_agreement": 1 - k,
              "perplexity": 3 + k, "gsm8k_accuracy": 0.1} for s, k in enumerate(kd)]
    summary = {(r["setting"], r["metric"]): r for r in summarize(rows, {"method": "ce"})}
    ce, fkl = summary["method=ce", "kl_to_teacher"], summary["method=fkl", "kl_to_teacher"]
    assert ce["mean"] == pytest.approx(sum(base) / 4) and ce["std"] == pytest.approx(stats.tstd(base))
    low, high = stats.t.interval(0.95, 3, loc=sum(kd) / 4, scale=stats.sem(kd))
    assert fkl["ci95"] == pytest.approx((high - low) / 2)
    test = stats.ttest_rel(kd, base)
    assert (fkl["t"], fkl["p"]) == (pytest.approx(test.statistic), pytest.approx(test.pvalue))
    diffs = [k - b for k, b in zip(kd, base)]
    assert fkl["diff"] == pytest.approx(sum(diffs) / 4)
    assert fkl["cohens_d"] == pytest.approx((sum(diffs) / 4) / stats.tstd(diffs))
    assert "t" not in ce and ce["baseline"] == "method=ce"
    flat = summary["method=fkl", "gsm8k_accuracy"]  # no variance in the differences: no test
    assert flat["p"] is None and flat["diff"] == pytest.approx(0) and summary["method=ce", "gsm8k_accuracy"]["ci95"] == 0


def test_config_errors_name_the_file(tmp_path, tiny_model_dir):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"student": "s", "grid": {"method": ["ce"]}}))
    with pytest.raises(EvalError, match=f"{path}: missing store, teacher, heldout, out, seeds"):
        load_config(path)
    good = {"student": "s", "store": "st", "teacher": "t", "heldout": "h", "out": "o", "seeds": [0],
            "grid": {"method": ["ce", "dpo"]}}
    path.write_text(yaml.safe_dump(good))
    with pytest.raises(EvalError, match="unknown method 'dpo'"):
        load_config(path)
    path.write_text(yaml.safe_dump({**good, "grid": {"method": ["ce"]}, "baseline": {"method": "fkl"}}))
    with pytest.raises(EvalError, match="baseline {'method': 'fkl'} matches no setting"):
        load_config(path)
    assert Cell({"method": "ce", "temperature": 2.0}, 1).ident == "method=ce,temperature=2.0,seed=1"


def test_bad_cell_flags_fail_before_any_cell_trains_and_bools_are_flags(tmp_path):
    from kdengine.evals.sweep import check_cells, train_argv

    cfg = {"student": "s", "store": "st", "out": str(tmp_path / "o"), "seeds": [0],
           "grid": {"method": ["ce", "rkl"]}, "train": {"steps": 3}}
    with pytest.raises(EvalError, match=r"cell method=rkl,seed=0: `kdengine train .*--divergence rkl` refuses its "
                                        r"flags \(exit 2\); fix the sweep's train/grid keys .*`tail: true`"):
        check_cells(cfg)
    assert not (tmp_path / "o").exists()
    cfg["train"] = {"steps": 3, "tail": True, "grad_checkpointing": False, "fused_head": False}
    check_cells(cfg)
    argv = train_argv(cfg, Cell({"method": "rkl"}, 0), tmp_path / "run")
    assert "--tail" in argv and "--no-fused-head" in argv and "--grad-checkpointing" not in argv
