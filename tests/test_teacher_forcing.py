"""The corpus and the teacher together: the distribution stored at position p is the teacher's
prediction of token p+1, taken from a right-padded batch exactly as from an unpadded forward."""
import json

import pytest
import torch

from kdengine.corpus import encode_prompt, load_corpus
from kdengine.teachers import load_teacher, topk_logprobs

K = 8
ROWS = [
    {"prompt": "How many apples does the farmer have?", "response": " He has 12 apples."},
    {"question": "Each student buys 3 books. How many books do 4 students buy?", "answer": "3 * 4 = 12.\n#### 12"},
    {"messages": [{"role": "user", "content": "How many pencils?"}, {"role": "assistant", "content": "Seven."},
                  {"role": "user", "content": "And cars?"}, {"role": "assistant", "content": "Two cars."}]},
]


@pytest.mark.parametrize("chat", [False, True])
def test_stored_positions_score_the_next_token(tiny_model_dir, tmp_path, chat):
    teacher = load_teacher(tiny_model_dir)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    samples = load_corpus(path, teacher.tokenizer, chat=chat).samples
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    ids = torch.full((len(samples), int(lengths.max())), teacher.tokenizer.pad_token_id, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :len(s.input_ids)] = torch.from_numpy(s.input_ids)
    top = topk_logprobs(teacher.logits(ids, lengths), K)

    prompt = encode_prompt(teacher.tokenizer, ROWS[0]["prompt"], chat=chat)
    assert samples[0].positions[0] == len(prompt) - 1
    for b, s in enumerate(samples):
        row = torch.from_numpy(s.input_ids).long()[None]
        pos = torch.from_numpy(s.positions).long()
        with torch.no_grad():
            logp = torch.log_softmax(teacher.model(row).logits[0].float(), dim=-1)  # unpadded forward
        ref = logp[pos].topk(K, dim=-1)
        torch.testing.assert_close(top.logp[b, pos], ref.values, rtol=0, atol=1e-5)
        torch.testing.assert_close(logp[pos].gather(-1, top.idx[b, pos].long()), ref.values, rtol=0, atol=1e-5)
        # the model's own shifted loss on the target tokens scores logits[p] against token p+1
        labels = torch.full_like(row, -100)
        labels[0, pos + 1] = row[0, pos + 1]
        with torch.no_grad():
            hf_loss = teacher.model(row, labels=labels).loss
        ours = -logp[pos, row[0, pos + 1]].mean()
        torch.testing.assert_close(ours, hf_loss, rtol=1e-5, atol=1e-6)
