"""Teacher backends behind one protocol (base.Teacher): hf.py (transformers), exl2.py (ExLlamaV2).

`load_teacher(path, backend=...)` picks the backend; backends are imported only when loaded.
"""
from kdengine.teachers.base import Generation, Prompt, Teacher, TeacherError, TopK, topk_logprobs
from kdengine.teachers.encoding import encode_chat, encode_text, special_prefix
from kdengine.teachers.fingerprint import tokenizer_fingerprint
from kdengine.teachers.load import BACKENDS, load_teacher, load_tokenizer

__all__ = [
    "BACKENDS", "Generation", "Prompt", "Teacher", "TeacherError", "TopK", "encode_chat", "encode_text",
    "load_teacher", "load_tokenizer", "special_prefix", "tokenizer_fingerprint", "topk_logprobs",
]
