"""Shared fixtures: a tiny real tokenizer (BPE trained here in a second) and a tiny random Llama saved
as a local `from_pretrained` directory, so every test runs the real loading code on local files."""
import random

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is was for on that with as by at from it he she they we you his her their "
    "has had have will would can could apples oranges books pencils dollars hours minutes miles cars "
    "student teacher farmer baker store market school each every more less than twice half total how "
    "many much does did buy sell give take left remain spend earn make cost price per week day year "
    "question answer so therefore first then next finally"
).split()


def _training_text(n_lines=400, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 15))]
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    lines += [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. #### {a - b}" for a in range(30) for b in range(0, 30, 7)]
    return lines


def build_tokenizer(out_dir, vocab_size=384):
    """Trains a byte-level BPE tokenizer and saves it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir, tokenizer, *, layers=2, hidden=64, seed=0, tied=False):
    """A random-init Llama over `tokenizer`'s vocabulary, saved with save_pretrained (safetensors);
    `tied`: the output head is the embedding matrix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a wider spread makes top-k order and tails meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    return build_model(out, AutoTokenizer.from_pretrained(tiny_tokenizer_dir))


def rewrite_shard_metadata(store_dir, file, **changes):
    """Rewrites one shard's __metadata__ (same tensors) and updates its manifest entry's bytes and
    sha256, as a consistent adversary would: only the checks against the shard's content can tell."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.numpy import save_file

    from kdengine.checksum import sha256_file

    path = Path(store_dir) / file
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)
    manifest_path = Path(store_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        if entry["file"] == file:
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))


# ---- training: a real store dumped from the tiny model, and a 1-layer student made from it ----
WORDS = ("apples oranges books cost each dollars how many does she buy sell give left total week day more "
         "less than twice half the a of to and in is was for on that with").split()
BASE = ["--batch-tokens", "256", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0", "--save-every", "0",
        "--seed", "0", "--workers", "0", "--warmup-steps", "2"]


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory, tiny_model_dir):
    """A 160-sample store (3 shards, top-8) dumped from the tiny model."""
    import json

    from click.testing import CliRunner

    from kdengine.cli import cli

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("kd_store")
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(160):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 30))]
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
            f.write(json.dumps({"text": " ".join(words).capitalize() + "."}) + "\n")
    result = CliRunner().invoke(cli, ["dump", "--teacher", str(tiny_model_dir), "--data", str(root / "corpus.jsonl"),
                                      "--out", str(root / "store"), "--top-k", "8", "--shard-samples", "64"])
    assert result.exit_code == 0, result.output
    return root / "store"


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tiny_model_dir):
    """A 1-layer student made from the tiny model (its first layer)."""
    from kdengine.train.student import make_student

    out = tmp_path_factory.mktemp("student")
    make_student(str(tiny_model_dir), layers=1, layer_map="first", out=str(out))
    return out


def train_args(student, store, out, *extra):
    """`kdengine train` arguments for a small fast run on the tiny store."""
    return ["--student", str(student), "--store", str(store), "--out", str(out), *BASE, *map(str, extra)]


def read_records(out, name="metrics"):
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(out) / f"{name}.jsonl").read_text().splitlines()]


def _weights(directory):
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol, rtol=1e-5), key


def rows_digest(ids, levels, tail, counts) -> str:
    """SHA-256 of a coder's decoded rows (int32 ids, levels, tail and, for ragged coders, counts):
    tests/fixtures/coder_v2 stores it for each frame."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for a in (ids, levels, tail) + (() if counts is None else (counts,)):
        h.update(np.ascontiguousarray(a, np.int32).tobytes())
    return h.hexdigest()
