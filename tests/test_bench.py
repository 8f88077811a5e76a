"""`kdengine bench` on two tiny models, its energy reading, and break-even arithmetic on fixed inputs."""
import json

import pytest
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.evals.bench import (REPORT_KEYS, break_even, cpu_model, distill_cost, rapl_domains, rapl_joules,
                                  read_rapl_uj)
from kdengine.evals.gsm8k import EvalError


@pytest.fixture(scope="module")
def bigger_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from conftest import build_model
    from transformers import AutoTokenizer

    return build_model(tmp_path_factory.mktemp("bigger_llama"), AutoTokenizer.from_pretrained(tiny_tokenizer_dir),
                       layers=8, hidden=256)


@pytest.mark.slow
def test_bench_two_models_gives_consistent_numbers(tmp_path, tiny_model_dir, bigger_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question: {a} apples and {a + 3} more?\nAnswer:"}) + "\n"
                               for a in range(4)))
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_model_dir), "--model", str(bigger_model_dir),
                                      "--prompts", str(prompts), "--batch-size", "3", "--max-new-tokens", "8",
                                      "--latency-queries", "2", "--cpu-watts", "12.5", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    small, big = report["models"]
    assert [m["model"] for m in report["models"]] == [str(tiny_model_dir), str(bigger_model_dir)]
    for m in (small, big):
        assert set(REPORT_KEYS) <= set(m)
        assert m["tokens_per_s"] * m["generate_s"] == pytest.approx(m["new_tokens"])
        assert m["prompt_tokens_per_s"] * m["generate_s"] == pytest.approx(m["prompt_tokens"])
        assert 0 <= m["latency_p50_s"] <= m["latency_p95_s"] and m["latency_queries"] == 2
        assert m["queries"] == 4 and 4 <= m["new_tokens"] <= 4 * 8
        assert m["peak_memory_mb"] >= m["rss_before_load_mb"] > 0
        assert m["energy_source"] in ("rapl", "estimate")
        if m["energy_source"] == "estimate":
            assert m["energy_j"] == pytest.approx(m["cpu_s"] * 12.5)
        assert m["energy_j_per_1k_queries"] == pytest.approx(m["energy_j"] / 4 * 1000)
    assert big["params"] > 10 * small["params"] and big["size_on_disk_mb"] > small["size_on_disk_mb"]
    # per generated token, so that completions of different lengths compare
    assert big["generate_s"] / big["new_tokens"] > small["generate_s"] / small["new_tokens"]
    assert report["break_even"] is None
    assert (tmp_path / "b" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| model | params |" in (tmp_path / "b" / "report.md").read_text()


def test_break_even_arithmetic_on_fixed_inputs(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    demo.joinpath("summary.json").write_text(json.dumps(
        {"run": {"threads": 2}, "stages": {"dump": {"wall_s": 100.0}, "train": {"wall_s": 500.0},
                                           "train_ce": {"wall_s": 400.0}}}))
    run = tmp_path / "train"
    run.mkdir()
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps({"targets": t, "targets_per_s": r}) + "\n"
                                                     for t, r in [(1000, 100.0), (3000, 150.0)]))
    cost = distill_cost([demo, run], cpu_watts=10.0)
    assert cost["wall_s"] == pytest.approx(600 + 10 + 20)
    assert cost["runs"][0]["parts_s"] == {"dump": 100.0, "train": 500.0}  # the CE baseline is no cost of KD
    import os
    assert cost["energy_j"] == pytest.approx(600 * 2 * 10 + 30 * (os.cpu_count() or 1) * 10)

    teacher = {"model": "T", "energy_j_per_1k_queries": 5000.0, "latency_p50_s": 2.0}
    student = {"model": "S", "energy_j_per_1k_queries": 1000.0, "latency_p50_s": 0.5}
    worse = {"model": "W", "energy_j_per_1k_queries": 6000.0, "latency_p50_s": 2.5}
    fixed = {"wall_s": 600.0, "energy_j": 12000.0}
    be = break_even([teacher, student, worse], fixed)
    assert be["teacher"] == "T" and be["inputs"]["distill"] is fixed
    s, w = be["students"]
    assert s["energy_saved_j_per_query"] == pytest.approx(4.0)
    assert s["queries_to_break_even_energy"] == pytest.approx(12000 / 4.0)
    assert s["queries_to_break_even_time"] == pytest.approx(600 / 1.5)
    assert w["queries_to_break_even_energy"] is None and w["queries_to_break_even_time"] is None and "never" in w["note"]

    with pytest.raises(EvalError, match="not a kdengine run directory"):
        distill_cost([tmp_path])


def test_rapl_reading_and_counter_wrap(tmp_path):
    package = tmp_path / "intel-rapl:0"
    (package / "intel-rapl:0:0").mkdir(parents=True)  # a subzone (core) is not counted again
    package.joinpath("energy_uj").write_text("999000000\n")
    package.joinpath("max_energy_range_uj").write_text("1000000000\n")
    package.joinpath("intel-rapl:0:0", "energy_uj").write_text("5\n")
    domains = rapl_domains(tmp_path)
    assert domains == [package]
    before = read_rapl_uj(domains)
    package.joinpath("energy_uj").write_text("2000000\n")  # wrapped past 1e9 uJ
    assert rapl_joules(domains, before, read_rapl_uj(domains)) == pytest.approx(3.0)
    assert rapl_domains(tmp_path / "missing") == []


def test_bad_prompts_file_is_a_one_line_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_model_dir), "--prompts", str(bad),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and f"{bad}:2: expected a JSON object with a string field 'prompt'" in result.output


def _cpuinfo(vendor, family, model, name):
    block = f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: {name}\n"
    return block.format(0) + "\n" + block.format(1).replace(name, "other")


@pytest.mark.parametrize("vendor, family, model, expected", [
    ("AuthenticAMD", 23, 1, "AMD EPYC (family 23, model 1, Zen/Zen+)"),
    ("AuthenticAMD", 23, 49, "AMD EPYC (family 23, model 49, Zen 2)"),
    ("AuthenticAMD", 25, 1, "AMD EPYC (family 25, model 1, Zen 3)"),
    ("AuthenticAMD", 25, 17, "AMD EPYC (family 25, model 17, Zen 4)"),
    ("AuthenticAMD", 26, 2, "AMD EPYC (family 26, model 2, Zen 5)"),
    ("GenuineIntel", 6, 143, "Intel Xeon (family 6, model 143)"),
])
def test_cpu_model_tells_hosts_with_the_same_name_apart(vendor, family, model, expected):
    assert cpu_model(_cpuinfo(vendor, family, model, expected.split(" (")[0])) == expected


def test_cpu_model_without_family_keeps_the_name():
    assert cpu_model("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"
