"""Tokenizer fingerprint v2: every change that changes ids changes the fingerprint; batching and
decoding choices do not; version 1 stores still compare as they were written."""
import json
import warnings

import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdengine.teachers.fingerprint import V1_NOTE, fingerprint_version, tokenizer_fingerprint
from kdengine.train.errors import TrainError
from kdengine.train.guard import check_student_matches_store

SENTENCE = "The Farmer has 12 Apples and buys 7 more."


def variant(tokenizer_dir, change):
    """The tiny tokenizer with `change(backend Tokenizer)` applied, as a transformers tokenizer."""
    base = AutoTokenizer.from_pretrained(tokenizer_dir)
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    change(backend)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=base.bos_token, eos_token=base.eos_token,
                                   unk_token=base.unk_token, pad_token=base.pad_token)


def _lowercase_prefix_space(t):
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)


def _drop_last_merge(t):
    data = json.loads(t.to_str())
    data["model"]["merges"] = data["model"]["merges"][:-1]
    t.__setstate__(Tokenizer.from_str(json.dumps(data)).__getstate__())


def _post_processor_bos(t):
    t.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])


def _added_plain_token(t):
    t.add_tokens(["apples and"])


ID_CHANGES = {
    "lowercase + prefix space": _lowercase_prefix_space,
    "lowercase only": lambda t: setattr(t, "normalizer", normalizers.Lowercase()),
    "NFKC normalizer": lambda t: setattr(t, "normalizer", normalizers.NFKC()),
    "prefix space only": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "digits split": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])),
    "one merge fewer": _drop_last_merge,
    "post-processor adds BOS": _post_processor_bos,
    "an added non-special token": _added_plain_token,
    "an added special token": lambda t: t.add_special_tokens(["<|tool|>"]),
}


def test_the_variants_really_change_ids(tiny_tokenizer_dir):
    base = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    lowered = variant(tiny_tokenizer_dir, _lowercase_prefix_space)
    assert base(SENTENCE)["input_ids"] != lowered(SENTENCE)["input_ids"]


@pytest.mark.parametrize("name", list(ID_CHANGES))
def test_a_change_that_changes_ids_changes_the_fingerprint(tiny_tokenizer_dir, name):
    same = variant(tiny_tokenizer_dir, lambda t: None)
    changed = variant(tiny_tokenizer_dir, ID_CHANGES[name])
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(same)
    assert fingerprint_version(tokenizer_fingerprint(changed)) == 2


def test_batching_and_decoding_choices_do_not_change_it(tiny_tokenizer_dir, tmp_path):
    a = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b.pad_token = b.eos_token
    b.padding_side = "left"
    b.backend_tokenizer.enable_truncation(16)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    a.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_fingerprint(a)
    assert tokenizer_fingerprint(variant(tiny_tokenizer_dir, lambda t: None)) == tokenizer_fingerprint(a)


def test_lowercasing_tokenizer_is_refused_by_the_training_guard(tiny_tokenizer_dir):
    teacher = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    student = variant(tiny_tokenizer_dir, _lowercase_prefix_space)
    stored = tokenizer_fingerprint(teacher)
    with pytest.raises(TrainError, match="tokenizer mismatch"):
        check_student_matches_store(student_dir="student", student_fingerprint=tokenizer_fingerprint(student, like=stored),
                                    student_vocab=10_000, store_dir="store", store_fingerprint=stored, store_vocab=384)


def test_a_version_1_store_compares_as_written_and_says_how_to_upgrade(tiny_tokenizer_dir):
    teacher = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    stored_v1 = tokenizer_fingerprint(teacher, like="0" * 64)
    assert fingerprint_version(stored_v1) == 1 and len(stored_v1) == 64
    student = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.warns(UserWarning, match="fingerprint is version 1.*re-dump the store"):
        check_student_matches_store(student_dir="s", student_fingerprint=tokenizer_fingerprint(student, like=stored_v1),
                                    student_vocab=384, store_dir="store", store_fingerprint=stored_v1, store_vocab=384)
    assert "re-dump" in V1_NOTE
    with pytest.raises(TrainError, match="unknown version"):
        check_student_matches_store(student_dir="s", student_fingerprint="v9:x", student_vocab=384,
                                    store_dir="store", store_fingerprint="v9:" + "0" * 64, store_vocab=384)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        current = tokenizer_fingerprint(teacher)
        check_student_matches_store(student_dir="s", student_fingerprint=tokenizer_fingerprint(student, like=current),
                                    student_vocab=384, store_dir="store", store_fingerprint=current, store_vocab=384)
