"""`load_teacher`: one switch from a backend name to the module that loads it.

Each backend is imported only when asked for (transformers for "hf"; exllamav2, which needs CUDA, for
"exl2"), so importing kdengine stays cheap. A backend is a function `(path, *, device, dtype, **opts)
-> Teacher`; add one by adding an entry to BACKENDS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from kdengine.teachers.base import Teacher, TeacherError


def _load_hf(path, *, device, dtype, **opts) -> Teacher:
    from kdengine.teachers.hf import load_hf_teacher

    return load_hf_teacher(path, device=device or "cpu", dtype=dtype or "fp32", **opts)


def _load_exl2(path, *, device, dtype, **opts) -> Teacher:
    from kdengine.teachers.exl2 import load_exl2_teacher

    return load_exl2_teacher(path, device=device, dtype=dtype, **opts)


BACKENDS: dict[str, Callable[..., Teacher]] = {"hf": _load_hf, "exl2": _load_exl2}


def load_tokenizer(path: str | Path):
    """A teacher's tokenizer without its weights (a model directory, an EXL2 directory, which carries
    the HF tokenizer files, or a .gguf file), so a corpus can be tokenized and checked before the model
    loads. It is the tokenizer `load_teacher(path).tokenizer` has, pad token included.

    Raises:
        TeacherError: the path is missing or not a model directory / .gguf file.
    """
    from kdengine.teachers.hf import load_tokenizer as hf_load_tokenizer

    return hf_load_tokenizer(path)


def load_teacher(path: str | Path, *, backend: str = "hf", device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, **backend_opts) -> Teacher:
    """Loads a teacher with the named backend.

    Args:
        path: what the backend loads (hf: a model directory with config.json, or a .gguf file;
            exl2: an EXL2 model directory).
        backend: a key of BACKENDS.
        device: "cpu", "cuda" or "cuda:N" (backends may accept fewer); None: the backend's default
            (hf: cpu; exl2: all visible GPUs, the only placement it has).
        dtype: "fp32", "bf16" or "fp16" (backends may accept fewer); None: the backend's default
            (hf: fp32; exl2: fp16, the only one it computes in).
        backend_opts: options only that backend knows (hf: attn_implementation; exl2: gpu_split,
            max_seq_len, cache_tokens, max_input_len, prefill, max_batch_size; see exl2.Exl2Teacher).
    Raises:
        TeacherError: an unknown backend, or the backend cannot load `path` as asked.
    """
    if backend not in BACKENDS:
        raise TeacherError(f"unknown teacher backend {backend!r}; choose one of: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](path, device=device, dtype=dtype, **backend_opts)
