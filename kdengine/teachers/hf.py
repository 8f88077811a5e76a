"""The transformers backend: any causal LM that `from_pretrained` loads from local files (a model
directory, or a GGUF file that transformers dequantizes to the chosen dtype), on the CPU or one CUDA
device.

    teacher = load_hf_teacher("models/SmolLM2.Q4_1.gguf", device="cuda", dtype="bf16")
    logits = teacher.logits(input_ids, lengths)            # [B, T, V], right-padded batch
    outs = teacher.generate(["Question: ...\\nAnswer:"], max_new_tokens=256, stop=["Question:"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig, StoppingCriteria,
                          StoppingCriteriaList)

from kdengine.teachers.base import Generation, Prompt, TeacherError, check_batch
from kdengine.teachers.encoding import encode_text, special_prefix
from kdengine.teachers.fingerprint import tokenizer_fingerprint

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def load_tokenizer(path: str | Path):
    """The tokenizer of a model directory or GGUF file, with a pad token set for batching.

    A missing pad token is set to an existing token (EOS, else UNK, else id 0); padded positions are
    always masked, and the fingerprint leaves the pad token out, so this changes nothing else.

    Raises:
        TeacherError: the path is missing or is not a model directory / .gguf file.
    """
    directory, gguf_file = _locate(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as e:
        raise TeacherError(f"{path}: transformers cannot load a tokenizer from it: {e}") from e
    if tokenizer.pad_token is None:
        for token in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.convert_ids_to_tokens(0)):
            if token is not None:
                tokenizer.pad_token = token
                break
    return tokenizer


def load_hf_teacher(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                    attn_implementation: str | None = None) -> "HFTeacher":
    """Loads a local model directory (with config.json) or a .gguf file as a teacher.

    Args:
        path: a `from_pretrained` directory, or a `.gguf` file (its tokenizer is read from the file).
        device: "cpu", "cuda" or "cuda:N".
        dtype: "fp32", "bf16" or "fp16" (or a torch dtype); GGUF weights are dequantized to it.
        attn_implementation: passed to `from_pretrained` ("sdpa", "eager", ...); None keeps its default.
    Raises:
        TeacherError: the path, device or dtype is unusable, or transformers cannot load the model.
    """
    directory, gguf_file = _locate(path)
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    tokenizer = load_tokenizer(path)
    kwargs = {"dtype": torch_dtype, "gguf_file": gguf_file}
    if torch_device.type == "cuda":
        kwargs["device_map"] = {"": torch_device}  # load straight onto the GPU, not via host memory
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise TeacherError(f"{path}: transformers cannot load a causal LM from it: {e}") from e
    if next(model.parameters()).device != torch_device:
        model = model.to(torch_device)
    return HFTeacher(model, tokenizer, name=str(Path(path).expanduser().resolve()))


class HFTeacher:
    """A transformers causal LM and its tokenizer behind the Teacher protocol (see base.py).

    Attributes:
        name: the resolved path the model was loaded from.
        tokenizer: its tokenizer (pad token set, see `load_tokenizer`).
        fingerprint: `tokenizer_fingerprint(tokenizer)`.
        vocab_size: V = len(tokenizer); logits are sliced to it when the model's output is padded wider.
        context_length: the model's max_position_embeddings (None when its config has none).
        device: where the model and its logits live.
    """

    def __init__(self, model, tokenizer, *, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.device = next(model.parameters()).device
        self.vocab_size = len(tokenizer)
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        max_id = max(tokenizer.get_vocab().values())
        if max_id >= self.vocab_size:
            raise TeacherError(f"{name}: the tokenizer has {self.vocab_size} tokens but uses id {max_id}; "
                               "its ids are not contiguous, so V = len(tokenizer) would cut real tokens")
        self._model_vocab = model.get_output_embeddings().weight.shape[0]
        if self._model_vocab < self.vocab_size:
            raise TeacherError(f"{name}: the model scores {self._model_vocab} tokens but its tokenizer has "
                               f"{self.vocab_size}; the model and tokenizer do not belong together")
        eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self._eos_ids = sorted(i for i in eos if i is not None)
        self._prefix = special_prefix(tokenizer)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Full-vocab next-token logits for a right-padded batch (no KV cache).

        Args:
            input_ids: int [B, T], right-padded; positions t >= lengths[b] are padding.
            lengths: int [B], each in [1, T].
        Returns:
            [B, T, V] in the model's dtype on `self.device`; rows past `lengths` are unspecified.
        Raises:
            ValueError: shapes, lengths or token ids out of range.
        """
        check_batch(input_ids, lengths, self._model_vocab)
        ids = input_ids.to(self.device, torch.long, non_blocking=True)
        length = ids.shape[1]
        mask = None  # a batch without padding takes the plain causal path, the fastest one
        if int(lengths.min()) < length:
            mask = (torch.arange(length, device=self.device)[None, :] < lengths.to(self.device)[:, None]).long()
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return out[..., :self.vocab_size] if self._model_vocab > self.vocab_size else out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, stop: Sequence[str] = (),
                 on_step: Callable[[int], None] | None = None) -> list[Generation]:
        """Greedy continuations, batched with left padding; see base.Teacher.generate."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts:
            return []
        encoded = [encode_text(self.tokenizer, p, prefix=self._prefix) if isinstance(p, str) else list(p)
                   for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("every prompt needs at least one token")
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        check_batch(input_ids, mask.sum(1), self._model_vocab)
        watch = _StopWatch(self.tokenizer, width, len(encoded), self._eos_ids, stop, on_step)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=self._eos_ids or None, pad_token_id=self.tokenizer.pad_token_id)
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=config, stopping_criteria=StoppingCriteriaList([watch]))
        results = []
        for row in range(len(encoded)):
            n_new = out.shape[1] - width if watch.finished_at[row] is None else watch.finished_at[row]
            n_text = n_new - 1 if watch.ended_by_eos[row] else n_new  # an EOS id need not be a special token
            text = self.tokenizer.decode(out[row, width:width + n_text].tolist(), skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
            results.append(Generation(text=text[:cut], new_tokens=n_new))
        return results


    def begin_decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> "HFDecoding":
        """Prefills a batch of prompts (token ids) into a KV cache for step-by-step decoding; see
        kdengine.decode. Left-padded, with the positions transformers' `generate` gives each row (the
        dynamic cache grows as needed, so max_new_tokens is not used)."""
        return HFDecoding(self, prompts)


class HFDecoding:
    """One batch being decoded with the KV cache: `logits` [B, V] predicts each row's first new
    token, and `step(tokens [B])` appends one token per row and returns the logits after it."""

    def __init__(self, teacher: HFTeacher, prompts: Sequence[Sequence[int]]):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self._teacher = teacher
        self.eos_ids = teacher._eos_ids
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), teacher.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
        check_batch(ids, mask.sum(1), teacher._model_vocab)
        self._mask = mask.to(teacher.device)
        positions = (self._mask.cumsum(-1) - 1).clamp_(min=0)
        self._next = positions[:, -1:] + 1
        self._cache = DynamicCache(config=teacher.model.config)
        self.logits = self._forward(ids.to(teacher.device), positions)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        logits = self._forward(tokens.to(self._teacher.device, torch.long)[:, None], self._next)
        self._next = self._next + 1
        return logits

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self._teacher.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                                  cache=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :self._teacher.vocab_size]


class _StopWatch(StoppingCriteria):
    """A stopping criterion for `generate`: a row is finished when it emits an EOS id or its generated
    text comes to contain a stop string; `finished_at[row]` records after how many new tokens, and
    `ended_by_eos[row]` whether the last of them is an EOS id. `on_step(n)` hears of every step: n
    rows were still running, so n tokens were generated."""

    def __init__(self, tokenizer, prompt_width: int, batch: int, eos_ids: Sequence[int], stop: Sequence[str],
                 on_step: Callable[[int], None] | None = None):
        self._tokenizer = tokenizer
        self._on_step = on_step
        self._prompt_width = prompt_width
        self._eos = set(eos_ids)
        self._stop = list(stop)
        # every token decodes to at least one byte, so a stop string that just completed lies in the
        # last len(bytes) tokens; one more covers a character split across tokens
        self._window = max((len(s.encode("utf-8")) for s in self._stop), default=0) + 1
        self.finished_at: list[int | None] = [None] * batch
        self.ended_by_eos = [False] * batch

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        n_new = input_ids.shape[1] - self._prompt_width
        if self._on_step is not None:
            self._on_step(sum(f is None for f in self.finished_at))
        last = input_ids[:, -1].tolist()
        tails = input_ids[:, max(self._prompt_width, input_ids.shape[1] - self._window):].tolist()
        for row, done in enumerate(self.finished_at):
            if done is not None:
                continue
            if last[row] in self._eos:
                self.finished_at[row], self.ended_by_eos[row] = n_new, True
            elif self._stop and self._contains_stop(tails[row]):
                self.finished_at[row] = n_new
        return torch.tensor([f is not None for f in self.finished_at], device=input_ids.device)

    def _contains_stop(self, tail: list[int]) -> bool:
        text = self._tokenizer.decode(tail)
        return any(s in text for s in self._stop)


def _locate(path: str | Path) -> tuple[str, str | None]:
    """(directory for from_pretrained, gguf file name or None)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TeacherError(f"{p}: no such file or directory; the teacher must be a local model directory "
                           "(with config.json) or a .gguf file")
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), None
        ggufs = sorted(q.name for q in p.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass that file instead" if ggufs else ""
        raise TeacherError(f"{p}: not a model directory: no config.json{hint}")
    if p.suffix.lower() != ".gguf":
        raise TeacherError(f"{p}: not a .gguf file; the teacher must be a local model directory "
                           "(with config.json) or a .gguf file")
    return str(p.parent), p.name


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TeacherError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise TeacherError(f"device {device!r} is not supported by the hf backend; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise TeacherError(f"device {device!r} asked for, but CUDA is not available (torch {torch.__version__}, "
                           f"built for CUDA {torch.version.cuda}); use --device cpu or a CUDA build of torch on a GPU")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise TeacherError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", index)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise TeacherError(f"dtype {dtype!r} is not supported; use fp32, bf16 or fp16")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
