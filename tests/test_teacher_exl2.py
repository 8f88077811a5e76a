"""The EXL2 backend's CPU side: everything it does that does not need exllamav2 or a GPU, the clear
error it gives where exllamav2 cannot run, and the metric maths of scripts/gpu_check_exl2.py.
The GPU side (conversion, logits, generation) is exercised by scripts/gpu_check_exl2.py."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdengine.teachers import TeacherError, load_teacher, topk_logprobs
from kdengine.teachers import exl2
from kdengine.teachers.exl2 import (
    UNAVAILABLE,
    Exl2Unavailable,
    legacy_rope_keys,
    parse_gpu_split,
    plan_chunks,
    plan_row_groups,
    rope_config_overrides,
    slice_vocab,
    tokenizer_info,
)

REPO = Path(__file__).resolve().parents[1]
needs_cpu_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")


def _gpu_check_module():
    """scripts/gpu_check_exl2.py as a module (importing it runs nothing)."""
    if "gpu_check_exl2" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check_exl2", REPO / "scripts" / "gpu_check_exl2.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check_exl2"] = module  # its dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    return sys.modules["gpu_check_exl2"]


# --- vocabulary slicing --------------------------------------------------------------------------

def _as_exl2_head_output(logits: torch.Tensor) -> torch.Tensor:
    """What exllamav2 returns for these logits: fp16, the head padded to a multiple of 32 with -65504."""
    pad = -logits.shape[-1] % 32
    return torch.nn.functional.pad(logits.half(), (0, pad), value=-65504.0)


@pytest.fixture(scope="module")
def odd_vocab_model_dir(tmp_path_factory):
    """A tiny random Llama whose vocabulary (379) is not a multiple of 32, so exllamav2 would pad its head."""
    from conftest import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("odd_vocab_llama")
    return build_model(out, build_tokenizer(out, vocab_size=379))


def test_slice_vocab_drops_exl2_head_padding_on_real_model_logits(odd_vocab_model_dir):
    teacher = load_teacher(odd_vocab_model_dir, backend="hf")
    ids = teacher.tokenizer(["the farmer has 12 apples", "how many"], padding=True, return_tensors="pt")
    logits = teacher.logits(ids["input_ids"], ids["attention_mask"].sum(1))
    vocab = teacher.vocab_size
    assert vocab == 379
    padded = _as_exl2_head_output(logits)
    assert padded.shape[-1] > vocab and (padded[..., vocab:] == -65504.0).all()

    sliced = slice_vocab(padded, vocab)
    assert sliced.shape == (*logits.shape[:-1], vocab)
    assert sliced.data_ptr() == padded.data_ptr()  # a view: no copy of [B, T, V]
    assert not (sliced == -65504.0).any()
    torch.testing.assert_close(sliced, logits.half(), rtol=0, atol=0)
    ours, reference = topk_logprobs(sliced, 8), topk_logprobs(logits.half(), 8)
    torch.testing.assert_close(ours.idx, reference.idx, rtol=0, atol=0)
    torch.testing.assert_close(ours.logp, reference.logp, rtol=0, atol=0)


def test_slice_vocab_drops_model_rows_beyond_the_tokenizer():
    logits = torch.randn(2, 3, 70)  # a model head wider than its tokenizer (e.g. Qwen: 152064 vs 151665)
    torch.testing.assert_close(slice_vocab(logits, 64), logits[..., :64])


def test_slice_vocab_refuses_a_model_narrower_than_its_tokenizer():
    with pytest.raises(TeacherError, match="returns 60 logits per position but its tokenizer has 64 tokens"):
        slice_vocab(torch.zeros(1, 2, 60), 64)


# --- chunk and batch planning --------------------------------------------------------------------

@pytest.mark.parametrize("length, max_input_len, expected", [
    (1, 2048, [(0, 1)]),
    (2048, 2048, [(0, 2048)]),
    (2049, 2048, [(0, 2048), (2048, 2049)]),
    (4096, 2048, [(0, 2048), (2048, 4096)]),
    (7, 3, [(0, 3), (3, 6), (6, 7)]),
    (5, 1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    (0, 16, []),
])
def test_plan_chunks_cases(length, max_input_len, expected):
    assert plan_chunks(length, max_input_len) == expected


def test_plan_chunks_tiles_every_length_exactly():
    for max_input_len in (1, 2, 3, 8, 64):
        for length in range(0, 200):
            spans = plan_chunks(length, max_input_len)
            assert [i for a, b in spans for i in range(a, b)] == list(range(length))
            assert all(0 < b - a <= max_input_len for a, b in spans)
            assert len(spans) == math.ceil(length / max_input_len)


@pytest.mark.parametrize("length, max_input_len", [(-1, 8), (4, 0)])
def test_plan_chunks_rejects_bad_arguments(length, max_input_len):
    with pytest.raises(ValueError, match="need length >= 0 and max_input_len >= 1"):
        plan_chunks(length, max_input_len)


def test_plan_row_groups_groups_rows_and_trims_padding():
    assert plan_row_groups([5, 3, 9, 2, 7], 2) == [(0, 2, 5), (2, 4, 9), (4, 5, 7)]
    assert plan_row_groups([5, 3, 9], 8) == [(0, 3, 9)]
    assert plan_row_groups([4, 4, 4], 1) == [(0, 1, 4), (1, 2, 4), (2, 3, 4)]
    assert plan_row_groups([], 4) == []
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        plan_row_groups([3], 0)


def test_parse_gpu_split():
    assert parse_gpu_split("20,24") == [20.0, 24.0]
    assert parse_gpu_split(" 70.5 ") == [70.5]
    for bad in ("20,,24", "20,x", "0,10", "-3", "nan", ""):
        with pytest.raises(ValueError, match="--gpu-split takes positive GB per GPU"):
            parse_gpu_split(bad)


# --- config fix-ups ------------------------------------------------------------------------------

def test_rope_keys_of_a_transformers5_config_reach_exllamav2(tiny_model_dir):
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert "rope_theta" not in config and "rope_parameters" in config  # as transformers 5 saves it
    legacy = legacy_rope_keys(config)
    assert legacy == {"rope_theta": config["rope_parameters"]["rope_theta"], "rope_scaling": None}
    assert rope_config_overrides(legacy) == {"rotary_embedding_base": float(config["rope_parameters"]["rope_theta"])}


def test_llama3_rope_scaling_maps_to_exllamav2_attributes():
    from transformers import LlamaConfig

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(rope_parameters=params).to_dict()  # Llama 3.1's RoPE, as transformers 5 writes it
    legacy = legacy_rope_keys(config)
    assert legacy["rope_theta"] == 500000.0 and legacy["rope_scaling"]["rope_type"] == "llama3"
    assert rope_config_overrides(legacy) == {
        "rotary_embedding_base": 500000.0, "alt_rope_method": "llama3", "l3_rope_factor": 8.0,
        "l3_rope_low_freq_factor": 1.0, "l3_rope_high_freq_factor": 4.0,
        "l3_rope_original_max_position_embeddings": 8192,
    }


def test_legacy_rope_config_needs_no_fix_up():
    assert legacy_rope_keys({"rope_theta": 1e6, "rope_scaling": None, "rope_parameters": {"rope_theta": 1e6}}) == {}
    assert legacy_rope_keys({"hidden_size": 8}) == {}
    assert rope_config_overrides({}) == {}


def test_unmapped_rope_scaling_is_refused_with_the_fix():
    legacy = legacy_rope_keys({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0]}})
    with pytest.raises(TeacherError, match="rope_type 'longrope'.*add `rope_theta` and `rope_scaling` to config.json"):
        rope_config_overrides(legacy)
    with pytest.raises(TeacherError, match="without a rope_theta"):
        legacy_rope_keys({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}})


# --- tokenizer side: same fingerprint as the HF backend ------------------------------------------

def _exl2_like_dir(model_dir: Path, out: Path) -> Path:
    """What exllamav2's converter leaves: the source's non-tensor files, config.json tagged exl2, and
    quantized tensors (left out here: the tokenizer side never reads them)."""
    out.mkdir()
    for item in model_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl2", "bits": 8.0, "head_bits": 8}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_tokenizer_info_matches_the_hf_backend(tiny_model_dir, tmp_path):
    hf = load_teacher(tiny_model_dir, backend="hf")
    for directory in (Path(tiny_model_dir), _exl2_like_dir(Path(tiny_model_dir), tmp_path / "exl2")):
        info = tokenizer_info(directory)
        assert info.fingerprint == hf.fingerprint
        assert info.vocab_size == hf.vocab_size == len(hf.tokenizer)
        assert info.tokenizer.pad_token_id == hf.tokenizer.pad_token_id
        assert info.stop_ids == hf._eos_ids


def test_stop_ids_follow_generation_config_then_config(tiny_model_dir, tmp_path):
    directory = _exl2_like_dir(Path(tiny_model_dir), tmp_path / "exl2")
    tokenizer = tokenizer_info(directory).tokenizer
    (directory / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "eos_token_id": [0, tokenizer.eos_token_id]}))
    assert exl2.stop_token_ids(directory, tokenizer) == sorted({0, tokenizer.eos_token_id})
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert exl2.stop_token_ids(directory, tokenizer) == sorted({5, tokenizer.eos_token_id})


# --- where exllamav2 cannot run: one clear error --------------------------------------------------

@needs_cpu_torch
def test_loading_on_a_cpu_machine_gives_the_clear_error(tiny_model_dir):
    for load in (lambda: load_teacher(tiny_model_dir, backend="exl2"),
                 lambda: exl2.Exl2Teacher(tiny_model_dir)):
        with pytest.raises(Exl2Unavailable) as caught:
            load()
        message = str(caught.value)
        assert message.startswith(UNAVAILABLE) and "built without CUDA" in message and "\n" not in message
        assert isinstance(caught.value, TeacherError)


def _fake_exllamav2(root: Path, body: str) -> Path:
    """A stand-in `exllamav2` package whose import runs `body`: proves when (and whether) it is imported."""
    (root / "exllamav2").mkdir(parents=True)
    (root / "exllamav2" / "__init__.py").write_text(body)
    return root


def test_each_reason_exllamav2_cannot_run_is_named(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exl2Unavailable, match=r"\(torch .* sees no GPU\)$"):
        load_teacher(tiny_model_dir, backend="exl2")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if importlib.util.find_spec("exllamav2") is None:
        with pytest.raises(Exl2Unavailable, match=r"\(exllamav2 is not installed\)$"):
            load_teacher(tiny_model_dir, backend="exl2")

    if "exllamav2" in sys.modules:  # a real one imported earlier in this process would shadow the stand-in
        return
    fake = _fake_exllamav2(tmp_path, "import torch\ntorch.set_num_threads(1)\n"
                                     "raise OSError('Error building extension exllamav2_ext\\nninja: build stopped')\n")
    monkeypatch.syspath_prepend(str(fake))
    threads = torch.get_num_threads()
    with pytest.raises(Exl2Unavailable) as caught:
        load_teacher(tiny_model_dir, backend="exl2")
    assert str(caught.value) == f"{UNAVAILABLE} (importing exllamav2 failed: Error building extension exllamav2_ext)"
    assert torch.get_num_threads() == threads  # exllamav2's import-time set_num_threads(1) is undone


@needs_cpu_torch
def test_importing_kdengine_never_imports_exllamav2(tmp_path, tiny_model_dir):
    fake = _fake_exllamav2(tmp_path, "raise SystemExit('exllamav2 was imported')\n")
    code = (
        "import kdengine, kdengine.cli, kdengine.teachers, kdengine.teachers.exl2 as e\n"
        f"try:\n    e.load_exl2_teacher({str(tiny_model_dir)!r})\n"
        "except e.Exl2Unavailable as err:\n    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(UNAVAILABLE)  # refused before any import (so before any JIT build)


@needs_cpu_torch
def test_dump_with_exl2_backend_fails_with_one_line(tiny_model_dir, tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text(json.dumps({"text": "the farmer has 12 apples and gives 5 away"}) + "\n")
    cmd = [sys.executable, "-m", "kdengine", "dump", "--teacher", str(tiny_model_dir), "--backend", "exl2",
           "--data", str(data), "--out", str(tmp_path / "store"), "--top-k", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert UNAVAILABLE in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_gpu_split_is_refused_for_the_hf_backend(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from kdengine.cli import cli

    data = tmp_path / "corpus.jsonl"
    data.write_text(json.dumps({"text": "the farmer has 12 apples"}) + "\n")
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "store"), "--top-k", "4", "--gpu-split", "20,20"])
    assert result.exit_code == 2 and "--gpu-split only applies with --backend exl2" in result.output


def test_cli_backend_choices_are_the_loader_backends():
    from kdengine.cli import dump
    from kdengine.teachers.load import BACKENDS

    backend = next(p for p in dump.params if p.name == "backend")
    assert sorted(backend.type.choices) == sorted(BACKENDS)


@needs_cpu_torch
def test_eval_gsm8k_with_exl2_backend_fails_with_one_line(tiny_model_dir, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "How many apples?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    cmd = [sys.executable, "-m", "kdengine", "eval", "gsm8k", "--model", str(tiny_model_dir), "--backend", "exl2",
           "--data", str(data), "--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert UNAVAILABLE in done.stderr and "Traceback" not in done.stderr + done.stdout


# --- the GPU check's metric maths ----------------------------------------------------------------

def test_agreement_of_a_teacher_with_itself_is_perfect():
    metrics = _gpu_check_module()
    logits = torch.randn(37, 101) * 3
    sums = metrics.agreement_sums(logits, logits.clone(), 8)
    assert sums["n"] == 37 and sums["top1"] == 37 and sums["overlap"] == pytest.approx(37)
    assert abs(sums["kl_topk"]) < 1e-12 and abs(sums["kl_full"]) < 1e-12


def test_agreement_matches_hand_computed_values():
    metrics = _gpu_check_module()
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.35, 0.45, 0.1, 0.1], dtype=torch.float64)
    sums = metrics.agreement_sums(p.log()[None], q.log()[None], 2)
    assert sums["top1"] == 0  # hf's top token is 0, exl2's is 1
    assert sums["overlap"] == pytest.approx(1.0)  # both top-2 sets are {0, 1}
    kl_topk = 0.5 * math.log(0.5 / 0.35) + 0.3 * math.log(0.3 / 0.45) + 0.2 * math.log(0.2 / 0.2)
    kl_full = sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist()))
    assert sums["kl_topk"] == pytest.approx(kl_topk, rel=1e-12)
    assert sums["kl_full"] == pytest.approx(kl_full, rel=1e-12)


def test_bucketed_kl_is_bounded_by_full_kl_and_equal_when_buckets_are_tokens():
    metrics = _gpu_check_module()
    torch.manual_seed(0)
    ref, test = torch.randn(64, 50) * 2, torch.randn(64, 50) * 2
    for k in (1, 5, 20):
        sums = metrics.agreement_sums(ref, test, k)
        assert 0 <= sums["kl_topk"] <= sums["kl_full"]
    for k in (49, 50):  # the rest bucket is one token, or empty: the buckets are the tokens
        sums = metrics.agreement_sums(ref, test, k)
        assert sums["kl_topk"] == pytest.approx(sums["kl_full"], rel=1e-10)


def test_running_agreement_equals_one_shot_over_chunks():
    metrics = _gpu_check_module()
    torch.manual_seed(1)
    ref = torch.randn(50, 40).half()
    test = (ref.float() + 0.3 * torch.randn(50, 40)).half()
    running = metrics.Agreement(k=6)
    running.update(ref[:20], test[:20], rows_per_chunk=7)
    running.update(ref[20:], test[20:], rows_per_chunk=64)
    whole = metrics.agreement_sums(ref, test, 6)
    means = running.means()
    assert means["positions"] == 50
    for key in ("top1", "overlap", "kl_topk", "kl_full"):
        assert means[key] == pytest.approx(whole[key] / 50, rel=1e-9)


def test_gpu_check_arguments(tmp_path):
    metrics = _gpu_check_module()
    args = metrics.parse_args(["--work", str(tmp_path), "--from-gguf", "m.gguf", "--data", "d.jsonl"])
    assert args.stages == list(metrics.STAGES) and args.bpw == [8.0, 4.0] and args.top_k == 64
    args = metrics.parse_args(["--work", str(tmp_path), "--stages", "convert", "--bpw", "6.0"])
    assert args.stages == ["convert"] and args.bpw == [6.0]
    with pytest.raises(SystemExit):
        metrics.parse_args(["--work", str(tmp_path), "--stages", "compare"])  # compare needs --data
    with pytest.raises(SystemExit):
        metrics.parse_args(["--work", str(tmp_path), "--stages", "bogus", "--data", "d.jsonl"])


def test_gpu_check_report_renders_every_column():
    metrics = _gpu_check_module()
    compare = [{"bpw": 8.0, "positions": 100, "top1": 0.995, "overlap": 0.98, "kl_topk": 4e-4, "kl_full": 5e-4,
                "tok_s_hf": 1000.0, "tok_s_exl2": 900.0, "tok_s_exl2_padded": 1500.0, "causal_maxdiff": 0.01,
                "chunked_maxdiff": 0.02, "padded_maxdiff": 0.03, "causal_maxdiff_sdpa": 7.5,
                "exl2_attention": "matmul"}]
    dump = [{"teacher": "hf", "samples": 3, "tokens": 90, "wall_s": 2.0, "tok_s_wall": 45.0},
            {"teacher": "exl2-8.0", "samples": 3, "tokens": 90, "wall_s": 3.0, "tok_s_wall": 30.0,
             "store_top1": 0.99, "store_overlap": 0.97}]
    generate = [{"model": "hf", "problems": 4, "correct": 1, "new_tokens": 400, "tok_s": 50.0, "same_text_as_hf": 4}]
    table = metrics.format_tables(compare, dump, generate, "NVIDIA H100")
    assert "| 8.0 | 100 | 0.9950 | 0.9800 | 4.00e-04 | 5.00e-04 | 1000 | 900 | 1500 | 0.01 | 0.02 | 0.03 |" in table
    assert "which the backend turns off here: 8.0: 7.5" in table and "exl2 attention: matmul" in table
    assert "| exl2-8.0 | 3 | 90 | 3.0 | 30 | 0.9900 | 0.9700 |" in table and "| hf | 3 | 90 | 2.0 | 45 | - | - |" in table
    assert "| hf | 1/4 | 400 | 50 | 4/4 |" in table
