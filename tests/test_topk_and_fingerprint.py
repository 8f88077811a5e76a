import pytest
import torch

from kdengine.teachers import tokenizer_fingerprint, topk_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_logprobs_matches_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 131) * 4).to(dtype)
    out = topk_logprobs(logits, 9, rows_per_chunk=5)  # chunks that do not divide the 21 rows
    ref = torch.log_softmax(logits.float(), dim=-1).topk(9, dim=-1)
    assert out.idx.dtype == torch.int32 and out.logp.dtype == torch.float32
    assert out.idx.shape == out.logp.shape == (3, 7, 9)
    torch.testing.assert_close(out.logp, ref.values, rtol=0, atol=1e-5)
    # ids may swap only between exact ties, so compare the log-probs they point at
    full = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(full.gather(-1, out.idx.long()), ref.values, rtol=0, atol=1e-5)


def test_topk_logprobs_rejects_bad_k():
    with pytest.raises(ValueError, match="vocabulary size"):
        topk_logprobs(torch.zeros(2, 5), 6)


def test_fingerprint_is_stable_and_ignores_pad(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b.pad_token = b.eos_token
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["<|extra|>"], special_tokens=True)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
