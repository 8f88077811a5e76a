"""scripts/rskd_seeds.py: the cross-seed table counts each seed's interval on the right side of zero."""
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("rskd_seeds", Path(__file__).parents[1] / "scripts" / "rskd_seeds.py")
rskd_seeds = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(rskd_seeds)


def _result(seed, kl_delta, ece_delta, steps=120):
    arm = {"kl_to_teacher": 1.3, "ece_to_teacher": 0.05,
           "vs_top-64 + tail": {"kl_to_teacher": kl_delta, "ece_to_teacher": ece_delta}}
    return {"args": {"seed": seed, "steps": steps, "eval_problems": 96, "out": f"/x{seed}", "results": "r", "tag": "t"},
            "scores": {"teacher": {"positions": 100}, "top-64 + tail": {"kl_to_teacher": 1.2, "ece_to_teacher": 0.04},
                       "sampled-12": arm},
            "stores": {"top-64 + tail": {"bytes": 850, "positions": 10}, "sampled-12": {"bytes": 157, "positions": 10}}}


def test_verdicts_count_the_seeds_on_each_side_of_zero():
    text = rskd_seeds.render([_result(0, [0.05, 0.04, 0.07], [0.004, -0.002, 0.008]),
                              _result(1, [0.06, 0.05, 0.08], [-0.01, -0.02, -0.001])], ["a.json", "b.json"])
    row = next(line for line in text.splitlines() if line.startswith("| sampled-12 "))
    assert "| 15.7, 15.7 |" in row
    assert row.endswith("| 2 higher, 0 lower, 0 tie | 0 higher, 1 lower, 1 tie |")
    assert "1.3000 (+0.0500 [+0.0400, +0.0700])" in row
    base = next(line for line in text.splitlines() if line.startswith("| top-64 + tail "))
    assert base.endswith("| baseline | baseline |")


def test_runs_that_differ_in_more_than_the_seed_are_refused():
    with pytest.raises(SystemExit, match="other arguments"):
        rskd_seeds.render([_result(0, [0, -1, 1], [0, -1, 1]), _result(1, [0, -1, 1], [0, -1, 1], steps=16)],
                          ["a.json", "b.json"])
    with pytest.raises(SystemExit, match="another --seed"):
        rskd_seeds.render([_result(0, [0, -1, 1], [0, -1, 1])] * 2, ["a.json", "b.json"])


def test_across_seed_interval_is_a_t_interval_of_the_per_seed_differences():
    kl = [0.05, 0.06, 0.01]
    text = rskd_seeds.render([_result(s, [d, d - 0.01, d + 0.01], [0.0, -0.01, 0.01]) for s, d in enumerate(kl)],
                             ["a.json", "b.json", "c.json"])
    row = next(line for line in text.splitlines()[text.splitlines().index("| targets | KL mean Δ [95%] | ECE mean Δ [95%] |"):]
               if line.startswith("| sampled-12 "))
    mean = sum(kl) / 3
    sd = (sum((d - mean) ** 2 for d in kl) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert f"| {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] |" in row
    assert not any(line.startswith("| top-64 + tail |") and "[" in line
                   for line in text.splitlines()[text.splitlines().index("| targets | KL mean Δ [95%] | ECE mean Δ [95%] |"):])


def test_an_arm_missing_from_some_seeds_is_named_and_left_out():
    extra = _result(1, [0.05, 0.04, 0.07], [0.0, -0.01, 0.01])
    extra["args"]["samples"] = [[12, 1.0], [12, 2.0]]
    extra["scores"]["sampled-12@T2"] = extra["scores"]["sampled-12"]
    text = rskd_seeds.render([_result(0, [0.05, 0.04, 0.07], [0.0, -0.01, 0.01]), extra], ["a.json", "b.json"])
    assert "Arms not in every input, left out: sampled-12@T2." in text
    assert not any(line.startswith("| sampled-12@T2 ") for line in text.splitlines())
    assert any(line.startswith("| sampled-12 ") for line in text.splitlines())


def test_forest_plot_has_a_row_per_arm_and_seed_and_one_per_arm_across_seeds():
    results = [_result(s, [0.05 + s / 100, 0.04, 0.07], [0.0, -0.01, 0.01]) for s in range(3)]
    ax_kl, ax_ece = rskd_seeds.plot(results).axes
    labels = [t.get_text() for t in ax_kl.get_yticklabels()]
    assert labels == ["sampled-12, seed 0", "sampled-12, seed 1", "sampled-12, seed 2", "sampled-12, mean over seeds"]
    assert "KL" in ax_kl.get_xlabel() and "ECE" in ax_ece.get_xlabel()
    means = [line.get_xdata()[0] for line in ax_kl.lines if line.get_marker() == "D"]
    assert means == [pytest.approx(0.06)]  # the mean of the seeds' 0.05, 0.06, 0.07
