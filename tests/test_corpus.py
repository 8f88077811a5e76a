import json

import numpy as np
import pytest

from kdengine.corpus import GSM8K_PROMPT, CorpusError, check_corpus, encode_prompt, load_corpus, tokenize_corpus


@pytest.fixture()
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # fresh per test: some tests change it


@pytest.fixture()
def bos_tok(tok):
    """The tiny tokenizer with a post-processor that wraps text as <|endoftext|> text <|im_end|>: a BOS
    convention to follow, and an appended EOS that must not leak into prompts."""
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", 0), ("<|im_end|>", 2)]
    )
    return tok


def write_jsonl(tmp_path, rows, name="c.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def bare(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def labels(sample):
    return sample.input_ids[sample.positions + 1].tolist()


def only(corpus):
    assert len(corpus.samples) == 1
    return corpus.samples[0]


@pytest.mark.parametrize("which", ["tok", "bos_tok"])
def test_text_targets_every_position(tmp_path, request, which):
    tokenizer = request.getfixturevalue(which)
    text = "The farmer has 12 apples and 7 oranges."
    sample = only(load_corpus(write_jsonl(tmp_path, [{"text": text}]), tokenizer))
    prefix = [0] if which == "bos_tok" else []
    assert sample.input_ids.tolist() == prefix + bare(tokenizer, text)  # BOS kept, appended EOS not
    assert sample.positions.tolist() == list(range(len(sample.input_ids) - 1))
    assert sample.input_ids.dtype == np.int32 and sample.positions.dtype == np.int32


@pytest.mark.parametrize("which", ["tok", "bos_tok"])
def test_prompt_response_alignment(tmp_path, request, which):
    tokenizer = request.getfixturevalue(which)
    prompt, response = "How many apples does the farmer have?", " He has 12 apples."
    sample = only(load_corpus(write_jsonl(tmp_path, [{"prompt": prompt, "response": response}]), tokenizer))
    prompt_ids = encode_prompt(tokenizer, prompt, chat=False)  # what the evaluator feeds the model
    assert prompt_ids == ([0] if which == "bos_tok" else []) + bare(tokenizer, prompt)
    assert sample.positions[0] == len(prompt_ids) - 1
    assert sample.input_ids[:len(prompt_ids)].tolist() == prompt_ids
    assert labels(sample) == bare(tokenizer, response) + [tokenizer.eos_token_id]
    assert sample.positions.tolist() == list(range(len(prompt_ids) - 1, len(sample.input_ids) - 1))


def test_prompt_response_tokenized_apart_when_the_boundary_merges(tmp_path, tok):
    # "Answer: " alone ends in a lone space token; joined with "42" the space merges into " 42"
    prompt, response = "Answer: ", "42"
    assert bare(tok, prompt + response)[:len(bare(tok, prompt))] != bare(tok, prompt)
    sample = only(load_corpus(write_jsonl(tmp_path, [{"prompt": prompt, "response": response}]), tok))
    assert sample.input_ids[:len(bare(tok, prompt))].tolist() == bare(tok, prompt)
    assert labels(sample) == bare(tok, response) + [tok.eos_token_id]


def test_gsm8k_plain_and_chat(tmp_path, tok):
    row = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7.\n#### 7"}
    path = write_jsonl(tmp_path, [row])
    plain = only(load_corpus(path, tok))
    prompt = GSM8K_PROMPT.format(question=row["question"])
    assert tok.decode(plain.input_ids) == prompt + " " + row["answer"] + tok.eos_token
    assert plain.positions[0] == len(encode_prompt(tok, prompt, chat=False)) - 1
    assert labels(plain) == bare(tok, prompt + " " + row["answer"])[len(bare(tok, prompt)):] + [tok.eos_token_id]

    chat = only(load_corpus(path, tok, chat=True))
    chat_prompt = encode_prompt(tok, row["question"], chat=True)
    assert chat_prompt == tok.apply_chat_template([{"role": "user", "content": row["question"]}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.input_ids[:len(chat_prompt)].tolist() == chat_prompt
    assert chat.positions[0] == len(chat_prompt) - 1
    assert labels(chat) == bare(tok, row["answer"]) + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_messages_target_each_assistant_turn(tmp_path, tok):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How many apples?"},
        {"role": "assistant", "content": "Twelve apples."},
        {"role": "user", "content": "And pencils?"},
        {"role": "assistant", "content": "Three pencils, 3 in all."},
    ]
    sample = only(load_corpus(write_jsonl(tmp_path, [{"messages": messages, "id": "chat-1"}]), tok))
    assert sample.id == "chat-1"
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert sample.input_ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert labels(sample) == bare(tok, "Twelve apples.") + [end_of_turn] + bare(tok, "Three pencils, 3 in all.") + [end_of_turn]
    # each assistant turn starts right after what the evaluator would feed the model for that turn
    for turn in (2, 4):
        prompt = tok.apply_chat_template(messages[:turn], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert sample.input_ids[:len(prompt)].tolist() == prompt
        assert len(prompt) - 1 in sample.positions and len(prompt) - 2 not in sample.positions


def test_chat_template_that_rewrites_history_is_refused(tmp_path, tok):
    # hides earlier assistant turns, as reasoning templates do with past thoughts
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    path = write_jsonl(tmp_path, [{"text": "ok"}, {"messages": messages}])
    with pytest.raises(CorpusError, match=rf"^{path}:2: the chat template does not render assistant turn messages\[1\]"):
        load_corpus(path, tok)
    corpus = load_corpus(path, tok, skip_bad_lines=True)
    assert len(corpus.samples) == 1 and corpus.bad_lines[0].startswith(f"{path}:2: the chat template")


def test_chat_template_errors_and_missing_template(tmp_path, tok):
    path = write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}])
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(CorpusError, match=rf"^{path}:1: the chat template cannot render this conversation: .*roles must alternate"):
        load_corpus(path, tok, chat=True)
    tok.chat_template = None
    with pytest.raises(CorpusError, match=rf"^{path}:1: chat formatting needs the tokenizer's chat template"):
        load_corpus(path, tok, chat=True)
    assert len(load_corpus(path, tok).samples) == 1  # plain formatting needs no template


def test_ids_indices_and_blank_lines(tmp_path, tok):
    path = write_jsonl(tmp_path, [{"text": "one two"}, "", {"text": "three four", "id": 7}, "   ",
                                  {"text": "five six", "id": "x-1"}])
    corpus = load_corpus(path, tok)
    assert [(s.index, s.id, s.line) for s in corpus.samples] == [(0, "1", 1), (1, "7", 3), (2, "x-1", 5)]


def test_max_length_truncates_and_skips(tmp_path, tok):
    long_text = "the farmer has many apples and the baker has many books " * 4
    prompt = "How many apples does the farmer have in total this week?"
    rows = [{"text": long_text}, {"text": "short"}, {"prompt": prompt, "response": " 12"}, {"text": "a"}]
    path = write_jsonl(tmp_path, rows)
    full = load_corpus(path, tok)
    assert full.truncated == 0
    assert full.skipped == [f"{path}:4: no target position: 1 token(s) leave nothing to predict"]
    limit = len(bare(tok, prompt)) - 1  # the prompt alone does not fit
    cut = load_corpus(path, tok, max_length=limit)
    assert cut.truncated == 1 and [s.line for s in cut.samples] == [1, 2]
    assert [s.index for s in cut.samples] == [0, 1]
    long_sample = cut.samples[0]
    assert long_sample.input_ids.tolist() == full.samples[0].input_ids[:limit].tolist()
    assert long_sample.positions.tolist() == list(range(limit - 1))
    assert cut.skipped[0] == f"{path}:3: no target position within the first {limit} tokens (the first needs {limit + 2})"
    with pytest.raises(CorpusError, match="max_length must be at least 2"):
        load_corpus(path, tok, max_length=1)


BAD_LINES = [
    ("{not json", r"not valid JSON: Expecting property name enclosed in double quotes at column 2"),
    ("[1, 2]", r"expected a JSON object, got an array"),
    ('"text"', r"expected a JSON object, got a string"),
    ({"txt": "hi"}, r'no sample fields: expected "text", "prompt"\+"response", "question"\+"answer" or "messages"; got keys \[\'txt\'\]'),
    ({"text": "a", "prompt": "b", "response": "c"}, r'ambiguous sample: it has fields of several formats \("text", "prompt"\+"response"\)'),
    ({"prompt": "hi"}, r'has "prompt" but no "response"'),
    ({"answer": "#### 3"}, r'has "answer" but no "question"'),
    ({"text": 5}, r'"text" must be a string, got a number \(5\)'),
    ({"prompt": "a", "response": None}, r'"response" must be a string, got null'),
    ({"text": "  "}, r'"text" is empty'),
    ({"question": "", "answer": "#### 1"}, r'"question" is empty'),
    ({"text": "a", "id": 1.5}, r'"id" must be a string or an integer, got a number \(1.5\)'),
    ({"text": "a", "id": True}, r'"id" must be a string or an integer, got a boolean'),
    ({"messages": []}, r'"messages" must be a non-empty array of \{"role", "content"\} objects, got an empty array'),
    ({"messages": "hi"}, r'"messages" must be a non-empty array .* got a string'),
    ({"messages": ["hi"]}, r'messages\[0\] must be an object with "role" and "content", got a string'),
    ({"messages": [{"role": "bot", "content": "x"}]}, r'messages\[0\].role must be one of system, user, assistant; got "bot"'),
    ({"messages": [{"content": "x"}]}, r"messages\[0\].role must be one of system, user, assistant; got null"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, r"messages\[0\].content must be a string, got an array"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, r"messages\[1\].content is empty"),
    ({"messages": [{"role": "user", "content": "x"}]}, r'"messages" has no assistant turn'),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r"messages\[0\] is an assistant turn; an assistant turn needs"),
]


@pytest.mark.parametrize("row,message", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path, [{"text": "fine"}, row, {"text": "also fine"}])
    with pytest.raises(CorpusError, match=rf"^{path}:2: {message}") as err:
        check_corpus(path)
    assert err.value.bad_lines == [str(err.value)]


def test_duplicate_ids_and_not_utf8(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "a", "id": "q1"}, {"text": "b", "id": "q1"}])
    with pytest.raises(CorpusError, match=rf'^{path}:2: duplicate id "q1" \(first used on line 1\)'):
        check_corpus(path)
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=rf"^{raw}:2: not valid UTF-8"):
        check_corpus(raw)


def test_skip_bad_lines_lists_them_all(tmp_path, tok):
    rows = [{"text": "good one"}, "{oops", {"prompt": "only"}, {"text": "good two"}, [1]]
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(CorpusError) as err:
        check_corpus(path)
    assert str(err.value).startswith(f"{path}:2: not valid JSON")
    assert "3 bad lines in all" in str(err.value) and len(err.value.bad_lines) == 3
    checked = check_corpus(path, skip_bad_lines=True)
    assert [r.line for r in checked.records] == [1, 4]
    assert checked.bad_lines == [
        f"{path}:2: not valid JSON: Expecting property name enclosed in double quotes at column 2",
        f'{path}:3: has "prompt" but no "response"',
        f"{path}:5: expected a JSON object, got an array",
    ]
    corpus = tokenize_corpus(checked, tok)
    assert corpus.bad_lines == checked.bad_lines and [s.index for s in corpus.samples] == [0, 1]


def test_empty_missing_and_all_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(CorpusError, match=rf"^{empty}: empty file: expected one JSON object per line"):
        check_corpus(empty)
    with pytest.raises(CorpusError, match=r"nope.jsonl: no such file"):
        check_corpus(tmp_path / "nope.jsonl")
    bad = write_jsonl(tmp_path, ["{", "[]"], name="bad.jsonl")
    with pytest.raises(CorpusError, match=rf"^{bad}: no usable sample: all 2 lines are bad; the first: {bad}:1:"):
        check_corpus(bad, skip_bad_lines=True)
