"""Teacher backends behind one protocol (base.Teacher): hf.py (transformers), exl2.py (ExLlamaV2)."""
from kdengine.teachers.base import Generation, Teacher, TopK, topk_logprobs
from kdengine.teachers.fingerprint import tokenizer_fingerprint

__all__ = ["Generation", "Teacher", "TopK", "topk_logprobs", "tokenizer_fingerprint"]
