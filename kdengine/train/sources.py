"""Where a batch's teacher targets come from: a top-k store (`--store`), or a teacher that runs in the
training process on the same batches (`--teacher`, online). The loop sees one interface:

    source.num_samples, source.lengths          the samples, for the held-out split and the batch plan
    source.batches(sample_ids_of, pad_id)       a Dataset of collated batches (input ids, rows, labels)
    source.targets(batch) -> Targets            the teacher's side of one micro-batch

and a Targets object computes the loss against the student's logits (`loss`; where `can_fuse`, also
`loss_linear` against the output head's input and weight, never forming the logits), its KD and CE
parts, the held-out KD and the teacher's top-1, whatever the targets are: sparse top-k (from the
store, or taken from the online teacher's logits on the fly; both go to the same `sparse_kl` kernel,
so they differ only by the store's codec) or the teacher's full distribution (online dense KD, `dense_kl`).

Online, the corpus is read, tokenized and given target positions exactly as `kdengine dump` does
(`kdengine.corpus`, the teacher's tokenizer, --chat and --max-length), so a store dumped from the same
file and an online run see the same samples, positions and batches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdengine.store.format import TEMPERED_LSE, tempered_lse_column
from kdengine.train.data import collate
from kdengine.train.errors import TrainError
from kdengine.train.guard import check_student_matches_store
from kdengine.train.model import TargetLogits, decoder_layers


class SparseTargets:
    """The teacher's top-k ids int32 [N, K] and log-probs float32 [N, K], on the student's device; with
    the tail at T != 1 also c_T float32 [N] for the exact tempered tail (None: the one-token approximation,
    which the sources allow only behind --approx-tempered-tail).

    `loss` takes the student's logits; `loss_linear` (when `can_fuse`) the head's input and weight
    instead, through `linear_loss_fn` (`sparse_kl_linear`), with the same keywords and result."""

    def __init__(self, topk_idx: torch.Tensor, topk_logp: torch.Tensor, *, tail: bool, loss_fn,
                 divergence: str = "fkl", beta: float = 0.5, hidden: list[torch.Tensor] | None = None,
                 tempered_lse: torch.Tensor | None = None, linear_loss_fn=None):
        self.topk_idx, self.topk_logp = topk_idx, topk_logp
        self.tempered_lse = tempered_lse
        self.hidden = hidden
        self._tail, self._loss_fn, self._linear_loss_fn = tail, loss_fn, linear_loss_fn
        self._divergence, self._beta = divergence, beta

    @property
    def can_fuse(self) -> bool:
        """Whether `loss_linear` exists (the compiled kernels; not the pure-torch reference)."""
        return self._linear_loss_fn is not None

    def loss(self, logits, labels, *, alpha: float, temperature: float, with_parts: bool, validate: bool = True):
        """(loss summed over rows, [KD sum, CE sum] from the same kernel pass, or None); `validate=False`
        skips the data checks (and their host sync) once a first step has run with them."""
        result = self._loss_fn(logits, self.topk_idx, self.topk_logp, labels, **self._keywords(
            alpha=alpha, temperature=temperature, with_parts=with_parts, validate=validate))
        return self._split(result, with_parts)

    def loss_linear(self, hidden, weight, labels, *, alpha: float, temperature: float, with_parts: bool,
                    bias=None, softcap: float | None = None, validate: bool = True):
        """`loss(hidden @ weight.T (+ bias, softcap), ...)` without the [N, V] logits (`sparse_kl_linear`)."""
        result = self._linear_loss_fn(hidden, weight, self.topk_idx, self.topk_logp, labels, bias=bias,
                                      softcap=softcap, **self._keywords(alpha=alpha, temperature=temperature,
                                                                        with_parts=with_parts, validate=validate))
        return self._split(result, with_parts)

    def _keywords(self, *, alpha, temperature, with_parts, validate) -> dict:
        return dict(tail=self._tail, alpha=alpha, temperature=temperature, divergence=self._divergence,
                    beta=self._beta, tempered_lse=self.tempered_lse, reduction="sum", return_parts=with_parts,
                    validate=validate)

    @staticmethod
    def _split(result, with_parts: bool):
        if not with_parts:
            return result, None
        return result.loss, torch.stack([result.kd.detach(), result.ce.detach()])

    def eval_kd(self, logits: torch.Tensor) -> torch.Tensor:
        """KD at T = 1 summed over rows (every row counts)."""
        return self._loss_fn(logits, self.topk_idx, self.topk_logp, None, tail=self._tail, reduction="sum")

    def teacher_top1(self) -> torch.Tensor:
        return self.topk_idx.gather(1, self.topk_logp.argmax(1, keepdim=True)).squeeze(1).long()


class DenseTargets:
    """The teacher's logits [N, V_t] at the target rows (online dense KD): the full-vocabulary loss, on
    the student's logits (no fused head: `dense_kl` has no linear form)."""

    can_fuse = False

    def __init__(self, teacher_logits: torch.Tensor, *, divergence: str = "fkl", beta: float = 0.5,
                 hidden: list[torch.Tensor] | None = None):
        """`divergence`/`beta` are those of `dense_kl` (the same definitions as `sparse_kl`'s); the held-out
        `eval_kd` is always the forward KL, as the store path reports it."""
        self.teacher_logits = teacher_logits
        self.hidden = hidden
        self._divergence, self._beta = divergence, beta

    def loss(self, logits, labels, *, alpha: float, temperature: float, with_parts: bool, validate: bool = True):
        """(loss summed over rows, [KD sum, CE sum] or None); `validate` changes nothing: dense_kl checks
        shapes and options only, which costs no host sync."""
        from kdengine.losses.dense_kl import dense_kl_rows

        rows = dense_kl_rows(logits, self.teacher_logits, labels, divergence=self._divergence, beta=self._beta,
                             alpha=alpha, temperature=temperature)
        return rows.loss.sum(), torch.stack([rows.kd.sum(), rows.ce.sum()]) if with_parts else None

    def eval_kd(self, logits: torch.Tensor) -> torch.Tensor:
        from kdengine.losses.dense_kl import dense_kl

        return dense_kl(logits, self.teacher_logits, None, reduction="sum")

    def teacher_top1(self) -> torch.Tensor:
        return self.teacher_logits.argmax(-1)


class StoreSource:
    """Targets from a complete store written by `kdengine dump`: top-k (SparseTargets) or sampled
    (RS-KD, `sampled_targets.SampledTargets`)."""

    def __init__(self, path: str, *, tail: bool, temperature: float, loss_impl: str, divergence: str = "fkl",
                 beta: float = 0.5, approx_tempered_tail: bool = False):
        self.path = path
        self.store = _open_store(path)
        self.num_samples = len(self.store)
        self.lengths = _sample_lengths(self.store)
        self.description = f"store {path}"
        self._tail = tail
        self._sampled_tau = None  # a sampled-target store: its proposal temperature
        self._exact_top = 0  # and its exact head
        if self.store.targets == "sample":
            from kdengine.train.sampled_targets import check_sampled_options

            check_sampled_options(self.store, temperature=temperature, tail=tail)
            if divergence != "fkl":
                raise TrainError(f"store {path} holds sampled targets, whose loss is forward KL only; "
                                 f"--divergence {divergence} needs a top-k store (`kdengine dump --targets topk`)")
            self._sampled_tau = float(self.store.codec_params["proposal_temperature"])
            self._exact_top = int(self.store.codec_params.get("exact_top", 0))
        self._loss_impl = loss_impl
        self._loss_fn, self._linear_loss_fn = sparse_kl_function(loss_impl), sparse_kl_linear_function(loss_impl)
        self._divergence, self._beta = divergence, beta
        self._lse_column = None
        if self._sampled_tau is None and tail and temperature != 1:
            self._lse_column = tempered_lse_column(self.store.sections, temperature)
            if self._lse_column is None and not approx_tempered_tail:
                held = self.store.sections.get(TEMPERED_LSE, {}).get("params", {}).get("temperatures", [])
                raise TrainError(
                    f"store {path} holds no c_T for --temperature {temperature:g} (it holds "
                    f"{', '.join(f'{t:g}' for t in held) or 'none'}), so the tempered tail is unknown: re-dump with "
                    f"`kdengine dump ... --temperatures {temperature:g}`, train at a temperature the store holds, or "
                    "pass --approx-tempered-tail to treat the tail mass as one token (understates the tempered tail)")

    def check_student(self, student_dir: str, tokenizer, vocab: int) -> None:
        from kdengine.teachers import tokenizer_fingerprint

        fingerprint = tokenizer_fingerprint(tokenizer, like=self.store.tokenizer_fingerprint)
        check_student_matches_store(student_dir=student_dir, student_fingerprint=fingerprint, student_vocab=vocab,
                                    store_dir=self.path, store_fingerprint=self.store.tokenizer_fingerprint,
                                    store_vocab=self.store.vocab_size)

    def probe_ids(self, sample: int) -> torch.Tensor:
        return self.store[sample]["input_ids"].long()

    def batches(self, sample_ids_of, pad_id: int) -> Dataset:
        return _StoreBatches(self.path, sample_ids_of, pad_id)

    def targets(self, batch: dict):
        if self._sampled_tau is not None:
            from kdengine.losses import sampled_kl
            from kdengine.losses.sampled_reference import sampled_kl_reference
            from kdengine.train.sampled_targets import SampledTargets

            return SampledTargets(batch, proposal_temperature=self._sampled_tau, exact_top=self._exact_top,
                                  loss_fn=sampled_kl_reference if self._loss_impl == "reference" else sampled_kl)
        lse = None if self._lse_column is None else batch[TEMPERED_LSE][:, self._lse_column].contiguous()
        return SparseTargets(batch["topk_idx"], batch["topk_logp"], tail=self._tail, loss_fn=self._loss_fn,
                             divergence=self._divergence, beta=self._beta, tempered_lse=lse,
                             linear_loss_fn=self._linear_loss_fn)


class OnlineSource:
    """A transformers teacher in this process (replicated on every rank), run under no_grad on each
    micro-batch; its output head runs on the target rows only, so the one [N, V] tensor it adds is
    its logits there (dense), or not even that past the top-k selection (--online-top-k K)."""

    def __init__(self, *, teacher: str, data: str, device: torch.device, dtype: str | None, chat: bool,
                 max_length: int | None, top_k: int, tail: bool, temperature: float = 1.0, loss_impl: str = "kernel",
                 divergence: str = "fkl", beta: float = 0.5, progress: bool):
        from kdengine.corpus import CorpusError, check_corpus, tokenize_corpus
        from kdengine.teachers import TeacherError, load_teacher

        try:
            checked = check_corpus(data)  # a bad corpus fails before the teacher loads
            self.teacher = load_teacher(teacher, backend="hf", device=device,
                                        dtype=dtype or ("bf16" if device.type == "cuda" else "fp32"))
            corpus = tokenize_corpus(checked, self.teacher.tokenizer, chat=chat, max_length=max_length,
                                     progress=progress)
        except (CorpusError, TeacherError) as exc:
            raise TrainError(str(exc)) from None
        if not corpus.samples:
            raise TrainError(f"{data}: no sample has a target position; {corpus.skipped[:1]}")
        if top_k < 0 or top_k > self.teacher.vocab_size:
            raise TrainError(f"--online-top-k must be in [0, {self.teacher.vocab_size}] (0: dense KD over the "
                             f"teacher's vocabulary), got {top_k}")
        self.teacher.model.requires_grad_(False)
        self.samples = corpus.samples
        self.num_samples = len(self.samples)
        self.lengths = [len(s.input_ids) for s in self.samples]
        self.description = f"teacher {teacher}"
        self.device = self.teacher.device
        self.vocab_size = self.teacher.vocab_size
        self.num_layers = self.teacher.model.config.num_hidden_layers
        self.hidden_size = self.teacher.model.config.hidden_size
        self._teacher_path = teacher
        self._top_k, self._tail, self._loss_fn = top_k, tail, sparse_kl_function(loss_impl)
        self._linear_loss_fn = sparse_kl_linear_function(loss_impl)
        # the tail at T != 1 needs c_T, which the full logits give exactly
        self._temperatures = (temperature,) if tail and temperature != 1 else ()
        self._divergence, self._beta = divergence, beta
        self._head = TargetLogits(self.teacher.model)
        self._head.check_matches_full_forward(self.probe_ids(0)[None, :16].to(self.device))
        self._layers: list[int] = []
        self._outputs = None

    def check_student(self, student_dir: str, tokenizer, vocab: int) -> None:
        from kdengine.teachers import tokenizer_fingerprint

        fingerprint = tokenizer_fingerprint(tokenizer, like=self.teacher.fingerprint)
        if fingerprint != self.teacher.fingerprint:
            raise TrainError(
                f"tokenizer mismatch: student {student_dir} has tokenizer fingerprint {fingerprint[:16]}..., but "
                f"teacher {self._teacher_path} has {self.teacher.fingerprint[:16]}...; token ids would not line up. "
                f"Use a student made from this teacher (`kdengine make-student --teacher {self._teacher_path} ...`) "
                "or a teacher that shares the student's tokenizer"
            )
        if vocab < self.vocab_size:
            raise TrainError(
                f"vocabulary too small: student {student_dir} has {vocab} output rows, but teacher "
                f"{self._teacher_path} scores {self.vocab_size} tokens; the student's embedding and output head need "
                f"at least {self.vocab_size} rows (resize_token_embeddings({self.vocab_size}))"
            )

    def capture_hidden(self, teacher_layers: list[int]) -> None:
        """Also return the outputs of these teacher decoder layers at the target rows (feature KD)."""
        from kdengine.train.hidden import LayerOutputs

        self._layers = list(teacher_layers)
        self._outputs = LayerOutputs(decoder_layers(self.teacher.model), self._layers)

    def probe_ids(self, sample: int) -> torch.Tensor:
        return torch.from_numpy(self.samples[sample].input_ids.astype(np.int64))

    def batches(self, sample_ids_of, pad_id: int) -> Dataset:
        return _CorpusBatches(self.samples, sample_ids_of, pad_id)

    def teacher_outputs(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The teacher's logits [N, V_t] at the batch's rows and its hidden states per captured layer,
        on the teacher's device."""
        dev = self.device
        with torch.no_grad():
            logits = self._head(batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["rows"].to(dev))
            hidden = None
            if self._outputs is not None:
                rows = batch["rows"].to(dev)
                hidden = [self._outputs.take(t, rows) for t in self._layers]
                self._outputs.clear()
        return logits[:, :self.vocab_size], hidden

    def targets(self, batch: dict):
        from kdengine.teachers import topk_logprobs

        logits, hidden = self.teacher_outputs(batch)
        dev = batch["rows"].device
        hidden = None if hidden is None else [h.to(dev) for h in hidden]
        if self._top_k:
            top = topk_logprobs(logits, self._top_k, temperatures=self._temperatures)
            lse = None if top.tempered_lse is None else top.tempered_lse[:, 0].to(dev)
            return SparseTargets(top.idx.to(dev), top.logp.to(dev), tail=self._tail, loss_fn=self._loss_fn,
                                 divergence=self._divergence, beta=self._beta, hidden=hidden, tempered_lse=lse,
                                 linear_loss_fn=self._linear_loss_fn)
        return DenseTargets(logits.to(dev), divergence=self._divergence, beta=self._beta, hidden=hidden)


class _StoreBatches(Dataset):
    """Decodes and collates one batch of store samples per key; opens the store lazily in each
    DataLoader worker."""

    def __init__(self, store_dir: str, sample_ids_of, pad_id: int):
        self._store_dir = store_dir
        self._sample_ids_of = sample_ids_of
        self._pad_id = pad_id
        self._store = None

    def __getitem__(self, key) -> dict:
        from kdengine.store import StoreError, open_store

        try:
            if self._store is None:
                self._store = open_store(self._store_dir)
            return collate(self._store.samples(self._sample_ids_of(key)), pad_id=self._pad_id)
        except StoreError as exc:  # passed to the main process as data, not as a worker traceback
            return StoreFailure(str(exc))


class StoreFailure:
    """A store error met while decoding a batch (in a DataLoader worker or not); the loop raises it."""

    def __init__(self, message: str):
        self.message = message


class _CorpusBatches(Dataset):
    """Collates one batch of tokenized corpus samples per key (no teacher targets: the online teacher
    computes them in the training process)."""

    def __init__(self, samples: list, sample_ids_of, pad_id: int):
        self._samples = samples
        self._sample_ids_of = sample_ids_of
        self._pad_id = pad_id

    def __getitem__(self, key) -> dict:
        items = [{"input_ids": torch.from_numpy(self._samples[i].input_ids),
                  "positions": torch.from_numpy(self._samples[i].positions)} for i in self._sample_ids_of(key)]
        return collate(items, pad_id=self._pad_id)


def sparse_kl_function(impl: str):
    """The sparse KL loss: "kernel" (the compiled op) or "reference" (the pure-torch spec)."""
    if impl == "reference":
        return _reference_loss
    from kdengine.losses import sparse_kl

    return sparse_kl


def sparse_kl_linear_function(impl: str):
    """The fused head + sparse KL loss of "kernel" (`sparse_kl_linear`); None for "reference", whose
    point is the plain composition on the logits."""
    if impl == "reference":
        return None
    from kdengine.losses import sparse_kl_linear

    return sparse_kl_linear


def _reference_loss(*args, validate: bool = True, **kwargs):
    """`sparse_kl_reference`, which checks no data: `validate` (the kernel's data checks) has nothing to skip."""
    from kdengine.losses.reference import sparse_kl_reference

    return sparse_kl_reference(*args, **kwargs)


def _open_store(path: str):
    if not Path(path).is_dir():
        raise TrainError(f"store {path} does not exist; make one with "
                         f"`kdengine dump --teacher TEACHER --data FILE --out {path} --top-k 64`")
    from kdengine.store import StoreError, open_store

    try:
        store = open_store(path)
    except StoreError as exc:
        raise TrainError(f"store {path}: {exc}") from None
    if not store.complete:
        raise TrainError(f"store {path} is incomplete (its dump is running or was interrupted); re-run the same "
                         "`kdengine dump` command to finish it: training needs a fixed set of samples")
    if len(store) == 0:
        raise TrainError(f"store {path} holds no samples")
    return store


def _sample_lengths(store) -> list[int]:
    """Token count of every sample, from the shards' offset tables (no payload is decoded)."""
    return np.concatenate([np.diff(store.shard(s).token_offsets) for s in range(store.num_shards)]).tolist()
