"""The ExLlamaV2 teacher backend: an EXL2-quantized model over one or more GPUs.

exllamav2 is imported only when an `Exl2Teacher` is built: its import JIT-compiles a CUDA extension,
fails outright on a CPU-only torch, and sets torch's thread count to 1. Everything here that does not
need the GPU (tokenizer loading, chunk and batch planning, vocabulary slicing, config fix-ups) is a
plain function that runs and is tested on a CPU.

Facts about exllamav2 0.3.2 this module relies on:
- `model.forward(ids, cache=...)` returns fp16 logits for every position; without a cache a pass
  holds at most `max_input_len * max_batch_size` tokens, so longer samples go through a cache in chunks.
- The head's output dim is padded to a multiple of 32 and the padded logits are -65504: logits are
  sliced to the tokenizer's vocabulary before anything else sees them.
- Without flash-attn or xformers its torch-SDPA attention path passes no causal mask in 0.3.2, so
  prefill would attend to future tokens; the matmul path builds the mask, so SDPA is switched off then.
- Its config reader knows only the transformers-4 keys `rope_theta`/`rope_scaling`; a config.json
  written by transformers 5 keeps them in `rope_parameters`, which it would silently ignore.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from kdengine.teachers.base import Generation, Prompt, TeacherError, check_batch
from kdengine.teachers.encoding import encode_text, special_prefix

UNAVAILABLE = (
    "the exl2 backend needs a CUDA build of torch and a GPU (and `pip install kdengine[exl2]`); "
    "use --backend hf to run the teacher with transformers instead"
)
_CACHE_PAGE = 256  # the dynamic generator wants a cache length that is a multiple of its page size
PREFILL_POLICIES = ("sequence", "padded")


class Exl2Unavailable(TeacherError):
    """exllamav2 cannot run here: no CUDA torch, no GPU, not installed, or its extension failed to build."""


def plan_chunks(length: int, max_input_len: int) -> list[tuple[int, int]]:
    """[start, end) spans that cover `length` tokens, each at most `max_input_len` long, in order.

    Raises:
        ValueError: a negative length or a max_input_len below 1.
    """
    if length < 0 or max_input_len < 1:
        raise ValueError(f"need length >= 0 and max_input_len >= 1, got {length} and {max_input_len}")
    return [(start, min(start + max_input_len, length)) for start in range(0, length, max_input_len)]


def plan_row_groups(lengths: Sequence[int], max_rows: int) -> list[tuple[int, int, int]]:
    """Consecutive row groups of a right-padded batch for batched prefill without a cache.

    Each group is (first_row, end_row, width): at most `max_rows` rows, and `width` the longest length
    among them, so padding columns that no row in the group needs are never computed.

    Raises:
        ValueError: max_rows below 1.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    groups = []
    for start in range(0, len(lengths), max_rows):
        end = min(start + max_rows, len(lengths))
        groups.append((start, end, max(int(n) for n in lengths[start:end])))
    return groups


def left_padded_batch(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of prompts as exllamav2's batched generation takes it (`ExLlamaV2Tokenizer.encode(...,
    return_offsets=True)` and `padding_mask`): ids left-padded to the longest, int32 position offsets
    (minus each row's padding), and an fp16 additive mask, -inf on the padding. The mask is built from
    the padding itself, not from `ids == pad_id`, so a real token equal to the pad id is not masked.

    Returns:
        (ids int64 [B, W], offsets int32 [B], mask fp16 [B, W]).
    Raises:
        ValueError: no prompts, or an empty one.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.float16)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, :width - len(p)] = float("-inf")
    offsets = torch.tensor([len(p) - width for p in prompts], dtype=torch.int32)
    return ids, offsets, mask


def parse_gpu_split(text: str) -> list[float]:
    """`--gpu-split` ("20,24": GB of weights per visible GPU, in order) as a list for Exl2Teacher.

    Raises:
        ValueError: an entry that is not a positive number, naming it.
    """
    split = []
    for part in text.split(","):
        try:
            gb = float(part)
        except ValueError:
            gb = float("nan")
        if not gb > 0:
            raise ValueError(f"--gpu-split takes positive GB per GPU separated by commas (e.g. 20,24), got {part!r}")
        split.append(gb)
    return split


def slice_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The first `vocab_size` entries of the last dim (a view): drops the head's -65504 padding and any
    model vocabulary beyond the tokenizer's.

    Args:
        logits: float [..., V_model], V_model >= vocab_size.
    Raises:
        TeacherError: the model has fewer logits than the tokenizer has tokens.
    """
    if logits.shape[-1] < vocab_size:
        raise TeacherError(
            f"the model returns {logits.shape[-1]} logits per position but its tokenizer has {vocab_size} "
            "tokens; the tokenizer in the model directory does not belong to this model"
        )
    return logits[..., :vocab_size]


def legacy_rope_keys(config_json: dict) -> dict:
    """The transformers-4 `rope_theta`/`rope_scaling` keys for a config.json that only has
    transformers-5 `rope_parameters`; {} when the legacy keys are there already or nothing applies.

    Raises:
        TeacherError: per-layer-type rope_parameters, which have no single legacy equivalent.
    """
    params = config_json.get("rope_parameters")
    if "rope_theta" in config_json or not isinstance(params, dict):
        return {}
    if "rope_theta" not in params:
        raise TeacherError(
            f"config.json has rope_parameters {params} without a rope_theta (per-layer-type RoPE?), which "
            "exllamav2 0.3.2 cannot read; write `rope_theta` and `rope_scaling` into config.json by hand"
        )
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", "default")
    return {"rope_theta": params["rope_theta"], "rope_scaling": None if rope_type == "default" else scaling}


# Where exllamav2's config keeps each RoPE scaling kind: rope_scaling key -> ExLlamaV2Config attribute.
_ROPE_SCALING_ATTRS = {
    "linear": {"factor": "scale_pos_emb"},
    "llama3": {
        "factor": "l3_rope_factor",
        "low_freq_factor": "l3_rope_low_freq_factor",
        "high_freq_factor": "l3_rope_high_freq_factor",
        "original_max_position_embeddings": "l3_rope_original_max_position_embeddings",
    },
    "yarn": {
        "factor": "yarn_rope_factor",
        "original_max_position_embeddings": "yarn_rope_original_max_position_embeddings",
    },
}


def rope_config_overrides(legacy: dict) -> dict:
    """ExLlamaV2Config attributes (name -> value) that carry `legacy_rope_keys` output into exllamav2.

    Raises:
        TeacherError: a RoPE scaling kind this mapping does not cover.
    """
    if not legacy:
        return {}
    overrides = {"rotary_embedding_base": float(legacy["rope_theta"])}
    scaling = legacy.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type")
        if kind not in _ROPE_SCALING_ATTRS:
            raise TeacherError(
                f"config.json has rope_parameters of rope_type {kind!r}, which exllamav2 0.3.2 reads only from "
                f"the transformers-4 keys; add `rope_theta` and `rope_scaling` to config.json (covered here: "
                f"default, {', '.join(_ROPE_SCALING_ATTRS)})"
            )
        overrides.update({attr: scaling[key] for key, attr in _ROPE_SCALING_ATTRS[kind].items()})
        if kind != "linear":
            overrides["alt_rope_method"] = kind
    return overrides


class TokenizerInfo(NamedTuple):
    """What an EXL2 teacher takes from its directory's transformers tokenizer files."""

    tokenizer: object  # transformers tokenizer, pad token set (hf.load_tokenizer)
    fingerprint: str  # tokenizer_fingerprint(tokenizer): what the HF backend computes for the same files
    vocab_size: int  # V = len(tokenizer)
    stop_ids: list[int]  # ids that end a generation (stop_token_ids)


def tokenizer_info(model_dir: str | os.PathLike) -> TokenizerInfo:
    """The tokenizer side of an EXL2 directory, loaded exactly as the HF backend loads a directory, so
    a store dumped by either backend passes the other's tokenizer guard. Needs no exllamav2.

    Raises:
        TeacherError: no loadable tokenizer, or one whose ids are not contiguous (V = len(tokenizer)
            would cut real tokens).
    """
    from kdengine.teachers.fingerprint import tokenizer_fingerprint
    from kdengine.teachers.hf import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    vocab_size = len(tokenizer)
    max_id = max(tokenizer.get_vocab().values())
    if max_id >= vocab_size:
        raise TeacherError(f"{model_dir}: the tokenizer has {vocab_size} tokens but uses id {max_id}; its ids "
                           "are not contiguous, so V = len(tokenizer) would cut real tokens")
    return TokenizerInfo(tokenizer, tokenizer_fingerprint(tokenizer), vocab_size, stop_token_ids(model_dir, tokenizer))


def stop_token_ids(model_dir: str | os.PathLike, tokenizer) -> list[int]:
    """Every id that ends a generation, as transformers' generate sees them for this directory: the
    tokenizer's EOS and the eos_token_id(s) of generation_config.json, or of config.json without one."""
    model_dir = Path(model_dir)
    source = model_dir / "generation_config.json"
    if not source.exists():
        source = model_dir / "config.json"
    eos = json.loads(source.read_text(encoding="utf-8")).get("eos_token_id")
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    return sorted(int(i) for i in ids if i is not None)


def _import_exllamav2():
    """exllamav2's module, imported here for the first time; its import-time set_num_threads(1) undone.

    Raises:
        Exl2Unavailable: with UNAVAILABLE and the reason, before any JIT build is attempted where one
            cannot succeed.
    """
    if torch.version.cuda is None and torch.version.hip is None:
        raise Exl2Unavailable(f"{UNAVAILABLE} (this torch {torch.__version__} is built without CUDA)")
    if not torch.cuda.is_available():
        raise Exl2Unavailable(f"{UNAVAILABLE} (torch {torch.__version__} sees no GPU)")
    if importlib.util.find_spec("exllamav2") is None:
        raise Exl2Unavailable(f"{UNAVAILABLE} (exllamav2 is not installed)")
    threads = torch.get_num_threads()
    try:
        import exllamav2
        import exllamav2.attn
        import exllamav2.generator
    except Exception as exc:  # a failed JIT build surfaces as many exception types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Exl2Unavailable(f"{UNAVAILABLE} (importing exllamav2 failed: {reason})") from exc
    finally:
        torch.set_num_threads(threads)
    return exllamav2


def load_exl2_teacher(path: str | os.PathLike, *, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None, **opts) -> "Exl2Teacher":
    """Loads an EXL2 directory as a teacher (the `load_teacher(..., backend="exl2")` entry point).

    Args:
        path: an EXL2 model directory.
        device: None or "cuda": the model spreads over every visible GPU (choose them with
            CUDA_VISIBLE_DEVICES; split them with `gpu_split`).
        dtype: EXL2 layers compute in fp16 whatever is asked; another dtype only draws a warning
            (callers pass their hf default here).
        opts: Exl2Teacher's keyword options (gpu_split, max_seq_len, cache_tokens, max_input_len,
            prefill, max_batch_size).
    Raises:
        Exl2Unavailable: exllamav2 cannot run on this machine (checked first).
        TeacherError: a device other than cuda, or an unloadable directory.
    """
    _import_exllamav2()
    if device is not None and str(device) != "cuda":
        raise TeacherError(f"the exl2 backend places the model on all visible GPUs itself, so device {str(device)!r} "
                           "does not apply; leave --device unset or pass cuda (pick GPUs with CUDA_VISIBLE_DEVICES, "
                           "split them with --gpu-split)")
    if dtype is not None and dtype not in ("fp16", "float16", torch.float16):
        warnings.warn(f"the exl2 backend computes in fp16; dtype {dtype!r} is ignored", stacklevel=2)
    return Exl2Teacher(path, **opts)


class Exl2Teacher:
    """A teacher (see base.Teacher) backed by an EXL2 model directory.

    Args:
        model_dir: an EXL2 directory (config.json, *.safetensors, tokenizer.json and friends).
        gpu_split: GB of weights per visible GPU, in order, for a manual split; None loads with
            autosplit, filling each GPU in turn.
        max_seq_len: the longest sequence (a dump sample, or prompt + generation) the teacher takes;
            capped at the model's own limit. Sets the KV cache length.
        cache_tokens: KV cache length in tokens (rounded up to a multiple of 256); the dynamic
            generator shares it between concurrent generations. Default: max_seq_len.
        max_input_len: tokens per forward pass (longer sequences go through the cache in chunks).
        prefill: "sequence" runs each row of a logits() batch alone through the cache, chunked;
            "padded" runs up to `max_batch_size` right-padded rows in one pass without a cache
            (rows no longer than max_input_len; longer ones fall back to "sequence").
        max_batch_size: rows per padded prefill pass (sizes exllamav2's buffers).
    Raises:
        Exl2Unavailable: exllamav2 cannot run on this machine.
        TeacherError: the directory is not a loadable EXL2 model, or an option is out of range.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        gpu_split: Sequence[float] | None = None,
        max_seq_len: int = 4096,
        cache_tokens: int | None = None,
        max_input_len: int = 2048,
        prefill: str = "sequence",
        max_batch_size: int = 1,
    ):
        if prefill not in PREFILL_POLICIES:
            raise TeacherError(f"prefill must be one of {PREFILL_POLICIES}, got {prefill!r}")
        if min(max_seq_len, max_input_len, max_batch_size) < 1:
            raise TeacherError("max_seq_len, max_input_len and max_batch_size must be >= 1")
        self._exl2 = _import_exllamav2()
        model_dir = Path(model_dir).expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise TeacherError(f"{model_dir}: not an EXL2 model directory (no config.json)")
        self.name = str(model_dir)
        self.tokenizer, self.fingerprint, self.vocab_size, self._stop_ids = tokenizer_info(model_dir)
        self._prefix = special_prefix(self.tokenizer)
        self._prefill = prefill
        self._config = self._make_config(model_dir, max_seq_len, max_input_len, max_batch_size)
        self._model, self._cache = self._load(gpu_split, cache_tokens or self._config.max_seq_len)
        self.context_length = self._config.max_seq_len
        self.device = torch.device(self._model.modules[-1].device())
        self._generator = None

    @property
    def attention(self) -> str:
        """Which attention exllamav2 runs: "flash-attn", "xformers", or "matmul" where this backend has
        turned off its non-causal SDPA path ("sdpa" only if someone turns that back on)."""
        if self._exl2.attn.has_flash_attn and not self._config.no_flash_attn:
            return "flash-attn"
        if self._exl2.attn.has_xformers and not self._config.no_xformers:
            return "xformers"
        return "sdpa" if not self._config.no_sdpa else "matmul"

    def _make_config(self, model_dir: Path, max_seq_len: int, max_input_len: int, max_batch_size: int):
        exl2 = self._exl2
        try:
            config = exl2.ExLlamaV2Config(str(model_dir))
        except (AssertionError, ValueError, KeyError, TypeError, OSError) as exc:
            raise TeacherError(f"{model_dir}: not a loadable EXL2 model directory ({exc})") from exc
        config_json = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        for attr, value in rope_config_overrides(legacy_rope_keys(config_json)).items():
            setattr(config, attr, value)
        config.arch_compat_overrides(quiet=True)
        flash = exl2.attn.has_flash_attn and not config.no_flash_attn
        xformers = exl2.attn.has_xformers and not config.no_xformers
        if not (flash or xformers):
            config.no_sdpa = True  # see the module docstring: 0.3.2's SDPA path is not causal
        config.max_seq_len = min(config.max_seq_len, max_seq_len)
        config.max_input_len = min(max_input_len, config.max_seq_len)
        config.max_attention_size = config.max_input_len ** 2
        config.max_batch_size = max_batch_size
        return config

    def _load(self, gpu_split: Sequence[float] | None, cache_tokens: int):
        exl2 = self._exl2
        cache_len = -(-max(cache_tokens, self._config.max_seq_len) // _CACHE_PAGE) * _CACHE_PAGE
        model = exl2.ExLlamaV2(self._config)
        if gpu_split:
            model.load(gpu_split=list(gpu_split), progress=True)
            cache = exl2.ExLlamaV2Cache(model, max_seq_len=cache_len)
        else:
            cache = exl2.ExLlamaV2Cache(model, max_seq_len=cache_len, lazy=True)
            model.load_autosplit(cache, progress=True)
        return model, cache

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Full-vocab fp16 logits for a right-padded batch (see base.Teacher.logits).

        Args:
            input_ids: int64 [B, T], right-padded, on any device.
            lengths: int64 [B].
        Returns:
            fp16 [B, T, V] on `self.device`, V = len(tokenizer); positions past a row's length are 0.
        Raises:
            ValueError: shapes, lengths or token ids out of range.
            TeacherError: a row longer than max_seq_len.
        """
        check_batch(input_ids, lengths, self._config.vocab_size)
        ids = input_ids.to("cpu", torch.long)  # exllamav2 keeps the embedding table in system memory
        lens = [int(n) for n in lengths.tolist()]
        longest = max(lens)
        if longest > self._config.max_seq_len:
            raise TeacherError(
                f"a sample has {longest} tokens but the exl2 teacher was loaded with max_seq_len "
                f"{self._config.max_seq_len}; raise max_seq_len (up to the model's limit) or lower --max-length"
            )
        out = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size, dtype=torch.float16, device=self.device)
        if self._prefill == "padded" and longest <= self._config.max_input_len:
            for start, end, width in plan_row_groups(lens, self._config.max_batch_size):
                rows = self._model.forward(ids[start:end, :width].contiguous())
                out[start:end, :width] = slice_vocab(rows, self.vocab_size)
        else:
            for row, length in enumerate(lens):
                self._cache.current_seq_len = 0
                for start, end in plan_chunks(length, self._config.max_input_len):
                    chunk = self._model.forward(ids[row:row + 1, start:end].contiguous(), cache=self._cache)
                    out[row, start:end] = slice_vocab(chunk[0], self.vocab_size)
            self._cache.current_seq_len = 0
            if self._generator is not None:
                self._generator.reset_page_table()  # its cached pages were overwritten
        return out


    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, stop: Sequence[str] = (),
                 on_step: Callable[[int], None] | None = None) -> list[Generation]:
        """Greedy continuations with exllamav2's dynamic generator (see base.Teacher.generate).

        Text prompts are encoded with the transformers tokenizer (encoding.encode_text), so the model
        sees exactly the ids the HF backend would, and completions are decoded and cut the same way.
        The generator runs the prompts concurrently when flash-attn >= 2.5.7 gives it paged attention,
        one after another otherwise.
        """
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts:
            return []
        encoded = [encode_text(self.tokenizer, p, prefix=self._prefix) if isinstance(p, str) else [int(t) for t in p]
                   for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("every prompt needs at least one token")
        longest = max((len(ids) for ids in encoded), default=0)
        if longest + max_new_tokens > self._config.max_seq_len:
            raise TeacherError(
                f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the exl2 teacher's "
                f"max_seq_len {self._config.max_seq_len}; raise max_seq_len (up to the model's limit) or lower "
                "--max-new-tokens"
            )
        stop = [s for s in stop if s]
        generator = self._get_generator()
        jobs = [
            ExLlamaV2DynamicJob(
                input_ids=torch.tensor([ids], dtype=torch.long),
                max_new_tokens=max_new_tokens,
                stop_conditions=[*self._stop_ids, *stop],
                gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                identifier=i,
            )
            for i, ids in enumerate(encoded)
        ]
        generator.enqueue(jobs)
        tokens: list[list[int]] = [[] for _ in jobs]
        counted: list[int | None] = [None] * len(jobs)
        while generator.num_remaining_jobs():
            for result in generator.iterate():
                if result["stage"] != "streaming":
                    continue
                i = result["identifier"]
                streamed = _result_token_ids(result)
                tokens[i] += streamed
                if on_step is not None and streamed:
                    on_step(len(streamed))
                if result["eos"]:
                    counted[i] = result["new_tokens"]
        for i, (ids, n) in enumerate(zip(tokens, counted)):
            if len(ids) != n:
                raise RuntimeError(f"prompt {i}: exllamav2 reported {n} new tokens but streamed {len(ids)}")
        return [self._to_generation(ids, stop) for ids in tokens]

    def begin_decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> "Exl2Decoding":
        """Prefills a batch of prompts (token ids) for step-by-step decoding (see kdengine.decode), the way
        exllamav2's batched base generator does: left padding with position offsets and a padding
        mask, one batched cache, one forward per step; the logits of every step come back here and
        kdengine.decode picks the tokens (exllamav2's sampler is not used).

        Raises:
            TeacherError: more rows than max_batch_size, or prompt + max_new_tokens over max_seq_len.
        """
        return Exl2Decoding(self, prompts, max_new_tokens)

    def _decode_cache(self, rows: int, tokens: int):
        """A batched KV cache for decoding (kept for the next batch of the same size or smaller)."""
        length = -(-tokens // _CACHE_PAGE) * _CACHE_PAGE
        cache = getattr(self, "_batch_cache", None)
        if cache is None or cache.batch_size < rows or cache.max_seq_len < length:
            self._batch_cache = None  # free the old one first
            self._batch_cache = self._exl2.ExLlamaV2Cache(self._model, batch_size=rows, max_seq_len=length)
        self._batch_cache.current_seq_len = 0
        return self._batch_cache

    def _get_generator(self):
        if self._generator is None:
            from exllamav2.attn import has_flash_attn_with_paged
            from exllamav2.generator import ExLlamaV2DynamicGenerator

            try:
                exl2_tokenizer = self._exl2.ExLlamaV2Tokenizer(self._config)
            except FileNotFoundError as exc:
                raise TeacherError(
                    f"{self.name}: exllamav2 generates only with a tokenizer.json in the model directory; write one "
                    f"with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`"
                ) from exc
            # paged prefill goes in whole pages, so its chunk is max_input_len rounded down to pages
            chunk = self._config.max_input_len // _CACHE_PAGE * _CACHE_PAGE if has_flash_attn_with_paged else None
            if chunk == 0:
                raise TeacherError(f"generation with paged attention needs max_input_len >= {_CACHE_PAGE}, "
                                   f"got {self._config.max_input_len}")
            self._generator = ExLlamaV2DynamicGenerator(
                model=self._model, cache=self._cache, tokenizer=exl2_tokenizer, paged=has_flash_attn_with_paged,
                max_chunk_size=chunk,
            )
        return self._generator

    def _to_generation(self, ids: list[int], stop: Sequence[str]) -> Generation:
        # the generator ends a job on a stop id only as its last token; an EOS id need not be special
        text_ids = ids[:-1] if ids and ids[-1] in self._stop_ids else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
        return Generation(text=text[:cut], new_tokens=len(ids))


def _result_token_ids(result: dict) -> list[int]:
    """Token ids one streaming result carries: emitted ones, plus those still held back when the job
    ended on a stop token (the stop token among them)."""
    ids = []
    if "token_ids" in result:
        ids += result["token_ids"][0].tolist()
    if result["eos"] and "token_ids" in result.get("held", {}):
        ids += result["held"]["token_ids"][0].tolist()
    return ids


class Exl2Decoding:
    """One batch being decoded on an Exl2Teacher: `logits` [B, V] predicts each row's first new token;
    `step(tokens [B])` appends one token per row and returns the next logits (fp16, sliced to V)."""

    def __init__(self, teacher: Exl2Teacher, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        config = teacher._config
        if len(prompts) > config.max_batch_size:
            raise TeacherError(f"{len(prompts)} rows per decoding batch, but the exl2 teacher was loaded with "
                               f"max_batch_size {config.max_batch_size}; lower --batch-size or raise max_batch_size")
        ids, self._offsets, self._mask = left_padded_batch(prompts, teacher.tokenizer.pad_token_id)
        if ids.shape[1] + max_new_tokens > config.max_seq_len:
            raise TeacherError(f"a prompt of {ids.shape[1]} tokens plus max_new_tokens {max_new_tokens} exceeds the "
                               f"exl2 teacher's max_seq_len {config.max_seq_len}; raise max_seq_len (up to the "
                               "model's limit) or lower --max-new-tokens")
        check_batch(ids, torch.full((ids.shape[0],), ids.shape[1]), config.vocab_size)
        self._teacher = teacher
        self.eos_ids = teacher._stop_ids
        self._cache = teacher._decode_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        with torch.inference_mode():
            for start, end in plan_chunks(ids.shape[1] - 1, config.max_input_len):
                teacher._model.forward(ids[:, start:end].contiguous(), self._cache, input_mask=self._mask,
                                       preprocess_only=True, position_offsets=self._offsets)
            self.logits = self._forward(ids[:, -1:])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward(tokens.to("cpu", torch.long)[:, None])

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._teacher._model.forward(ids, self._cache, input_mask=self._mask, position_offsets=self._offsets)
        return slice_vocab(out[:, -1], self._teacher.vocab_size).to(self._teacher.device)
