"""Adversarial inputs to the one JSONL reader (corpus and GSM8K files): every bad line is a one-line
`file:line:` error, also under --skip-bad-lines, never a traceback or an unbounded allocation."""
import json
import tracemalloc

import pytest
from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.corpus import CorpusError, check_corpus
from kdengine.evals.data import read_problems
from kdengine.evals.gsm8k import EvalError
from kdengine.jsonl import MAX_DEPTH, MAX_LINE_BYTES, JsonlError, parse_line

GOOD = json.dumps({"text": "The farmer has 12 apples."})
GSM = json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"})

BAD_LINES = [  # (raw line, what the error says)
    (b'{"text": "a\\ud800b"}', r"lone surrogate \(\\ud800\)"),
    (b'{"text": "\\udfff"}', r"lone surrogate \(\\udfff\)"),
    (b'{"\\ud800": 1, "text": "x"}', r"lone surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, r"JSON nested 100000 levels deep; at most 64"),
    (b"{\"text\": " + b"[" * 100_000, r"JSON nested 100001 levels deep"),
    (b'{"text": "caf\xe9"}', r"not valid UTF-8 \(byte 14 of the line\)"),
    (b'{"text": "x"', r"not valid JSON"),
]


@pytest.mark.parametrize("raw, message", BAD_LINES)
def test_bad_line_is_a_clean_error_in_the_corpus_and_in_eval(tmp_path, raw, message):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(GOOD.encode() + b"\n" + raw + b"\n")
    with pytest.raises(CorpusError, match=rf"^{corpus}:2: .*{message}"):
        check_corpus(corpus)
    checked = check_corpus(corpus, skip_bad_lines=True)
    assert [r.line for r in checked.records] == [1] and len(checked.bad_lines) == 1
    gsm = tmp_path / "g.jsonl"
    gsm.write_bytes(GSM.encode() + b"\n" + raw + b"\n")
    with pytest.raises(EvalError, match=rf"^{gsm}:2: .*{message}"):
        read_problems(gsm)


def test_a_line_over_the_limit_is_refused_without_reading_it_whole(tmp_path):
    corpus = tmp_path / "big.jsonl"
    huge = b'{"text": "' + b"a" * (8 * MAX_LINE_BYTES) + b'"}'
    corpus.write_bytes(GOOD.encode() + b"\n" + huge + b"\n" + GOOD.replace("12", "13").encode() + b"\n")
    with pytest.raises(CorpusError, match=rf"^{corpus}:2: line longer than 1,048,576 bytes"):
        check_corpus(corpus)
    tracemalloc.start()
    checked = check_corpus(corpus, skip_bad_lines=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r.line for r in checked.records] == [1, 3]  # line numbers stay right after the long line
    assert peak < 4 * MAX_LINE_BYTES  # the 8 MiB line never sat in memory whole


def test_utf8_bom_crlf_and_offsets_are_read_the_same_by_both_readers(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n\r\n" + GOOD.replace("12", "3").encode() + b"\r\n")
    assert [r.line for r in check_corpus(corpus).records] == [1, 3]
    gsm = tmp_path / "g.jsonl"
    gsm.write_bytes(b"\xef\xbb\xbf" + GSM.encode() + b"\r\n")
    assert read_problems(gsm)[0].question == "What is 2 + 3?"
    for raw in (b'{"text": "\xff"}', b'{"text": "ok", "x": "\xc3"}'):
        reasons = []
        for reader, error in ((check_corpus, CorpusError), (read_problems, EvalError)):
            path = tmp_path / "u.jsonl"
            path.write_bytes(raw + b"\n")
            with pytest.raises(error) as info:
                reader(path)
            reasons.append(str(info.value).split(": ", 1)[1])
        assert reasons[0] == reasons[1]


def test_parse_line_limits_are_stated():
    assert MAX_DEPTH == 64 and MAX_LINE_BYTES == 1 << 20
    assert parse_line(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    with pytest.raises(JsonlError, match="nested 65 levels"):
        parse_line(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert parse_line(b'{"text": "[[[[ not nesting {{{{", "n": 1}' + b" " * 100)["n"] == 1


def test_dump_cli_skips_deep_and_surrogate_lines_and_says_so(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(GOOD.encode() + b"\n" + b"[" * 100_000 + b"\n" + b'{"text": "\\ud800"}\n')
    out = tmp_path / "store"
    args = ["dump", "--teacher", str(tiny_model_dir), "--data", str(corpus), "--out", str(out), "--top-k", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{corpus}:2: JSON nested 100000 levels deep" in result.output
    assert not out.exists()
    result = CliRunner().invoke(cli, args + ["--skip-bad-lines"])
    assert result.exit_code == 0, result.output
    assert f"skipped bad line: {corpus}:2: JSON nested" in result.output
    assert "truncated 0 (teacher context 512)" in result.output
    assert f"skipped bad line: {corpus}:3:" in result.output and "lone surrogate" in result.output
