"""The training run, top to bottom: inputs and guard -> data -> student -> optimizer -> resume ->
loop (micro-steps -> clip -> step -> log / eval / checkpoint) -> final model.

Runs alone or under torchrun; only rank 0 logs and writes files. The loss of a step is the sum of the
per-target losses over every micro-batch on every rank divided by the global target count, so it does
not depend on how the global batch is split into ranks and micro-batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from kdengine.train import checkpoint as ckpt_io
from kdengine.train.config import TrainConfig, write_config_yaml
from kdengine.train.data import BatchSchedule, DataPosition, collate, plan_batches, split_heldout
from kdengine.train.distributed import all_reduce_sum, barrier, gather_objects, init_distributed, shutdown, wrap_model
from kdengine.train.errors import TrainError
from kdengine.train.guard import check_student_matches_store
from kdengine.train.model import TargetLogits, check_student_dir, decoder_layers, load_student, tied_aliases
from kdengine.losses import sampled_kl
from kdengine.losses.sampled_reference import sampled_kl_reference
from kdengine.train.optim import build_optimizer, build_scheduler
from kdengine.train.sampled_targets import SampledTargets, check_sampled_options


def run(cfg: TrainConfig) -> dict:
    """Trains per `cfg`; returns the last logged metrics (rank 0; other ranks get {}).

    Raises:
        TrainError: missing store or student, tokenizer/vocab mismatch, a non-resumable --out.
    """
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


class _StoreBatches(Dataset):
    """Decodes and collates one batch of store samples per key; opens the store lazily in each
    DataLoader worker."""

    def __init__(self, store_dir: str, sample_ids_of, pad_id: int):
        self._store_dir = store_dir
        self._sample_ids_of = sample_ids_of
        self._pad_id = pad_id
        self._store = None

    def __getitem__(self, key) -> dict:
        if self._store is None:
            from kdengine.store import open_store

            self._store = open_store(self._store_dir)
        return collate([self._store[i] for i in self._sample_ids_of(key)], pad_id=self._pad_id)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.info = init_distributed()
        self.step = 0
        self.position = DataPosition(0, 0)
        self._metrics = None

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        store = _open_store(cfg.store)
        check_student_dir(cfg.student)
        from transformers import AutoConfig, AutoTokenizer

        from kdengine.teachers import tokenizer_fingerprint

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student)
        check_student_matches_store(
            student_dir=cfg.student,
            student_fingerprint=tokenizer_fingerprint(self.tokenizer, like=store.tokenizer_fingerprint),
            student_vocab=AutoConfig.from_pretrained(cfg.student).vocab_size,
            store_dir=cfg.store,
            store_fingerprint=store.tokenizer_fingerprint,
            store_vocab=store.vocab_size,
        )
        resume_from = self._resume_point(len(store))

        lengths = _sample_lengths(store)
        self.store_samples = len(store)
        try:
            train_ids, self.eval_ids = split_heldout(len(store), cfg.eval_fraction, cfg.seed)
        except ValueError as exc:
            raise TrainError(f"store {cfg.store}: {exc}; dump more samples or lower --eval-fraction") from None
        self.schedule = BatchSchedule(train_ids, lengths, cfg.batch_tokens, cfg.seed)
        self.eval_batches = plan_batches(self.eval_ids, lengths, cfg.batch_tokens, seed=None)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.train_data = _StoreBatches(cfg.store, self.schedule.batches_at, pad_id)
        self.eval_data = _StoreBatches(cfg.store, self.eval_batches.__getitem__, pad_id)

        self.hf_model = load_student(resume_from or cfg.student, grad_checkpointing=cfg.grad_checkpointing)
        self.hf_model.to(info.device)
        self._tied = tied_aliases(self.hf_model)
        head = TargetLogits(self.hf_model)
        probe = store[train_ids[0]]["input_ids"][:16].long()
        head.check_matches_full_forward(probe[None].to(info.device))
        self.module = wrap_model(head, decoder_layers(self.hf_model), info, fsdp=cfg.fsdp)
        self.module.train()
        self.optimizer = build_optimizer(self.module, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.loss_fn = _loss_function(cfg.loss_impl)
        self._sampled_tau = None  # a sampled-target store: its proposal temperature
        if store.targets == "sample":
            check_sampled_options(store, temperature=cfg.temperature, tail=cfg.tail)
            if cfg.divergence != "fkl":
                raise TrainError(f"store {cfg.store} holds sampled targets, whose loss is forward KL only; "
                                 f"--divergence {cfg.divergence} needs a top-k store (`kdengine dump --targets topk`)")
            self._sampled_tau = float(store.codec_params["proposal_temperature"])
        if resume_from is not None:
            self._load_training_state(resume_from)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_config_yaml(self.out / "config.yaml", cfg)
            self._metrics = _MetricsLog(self.out, keep_through_step=self.step if resume_from else None)
            self._say(
                f"{len(train_ids)} training samples, {len(self.eval_ids)} held out (seed {cfg.seed}); "
                f"{info.world} process(es) on {info.device.type}{self._parallelism()}; "
                f"step {self.step} of {cfg.steps}"
            )

    def _resume_point(self, store_samples: int) -> Path | None:
        existing = ckpt_io.newest_checkpoint(self.out)
        if not self.cfg.resume:
            if existing is not None:
                raise TrainError(
                    f"{self.out} already holds checkpoints (newest: {existing.name}); pass --resume to continue "
                    "that run or choose another --out"
                )
            return None
        if self.info.is_main:
            ckpt_io.remove_partial_checkpoints(self.out)
        barrier(self.info)
        if existing is None:
            self._say(f"--resume: no checkpoint in {self.out}; starting from step 0")
            return None
        state = ckpt_io.read_train_state(existing)
        if state.store_samples != store_samples:
            raise TrainError(f"{existing} was trained on a store of {state.store_samples} samples, {self.cfg.store} "
                             f"now has {store_samples}: the held-out split and batch order would change; "
                             "resume with the original store or start a new --out")
        if state.step >= self.cfg.steps:
            raise TrainError(f"{existing} is at step {state.step}, already >= --steps {self.cfg.steps}; "
                             "raise --steps to train further")
        return existing

    def _load_training_state(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt_io.read_train_state(path)
        for key, default in (("divergence", "fkl"), ("beta", 0.5)):  # a run's loss is one objective
            saved, now = state.config.get(key, default), getattr(self.cfg, key)
            if saved != now:
                raise TrainError(f"{path}: the run was trained with --{key} {saved}, this resume asks for {now}; "
                                 f"resume with --{key} {saved} or start a new --out")
        for line in ckpt_io.config_drift(state.config, self.cfg.to_dict()):
            self._say(f"warning: config changed since {path.name}: {line}")
        optim = ckpt_io.read_optimizer_state(path) if self.info.is_main or not self.info.distributed else {}
        set_optimizer_state_dict(
            self.module, self.optimizer, optim_state_dict=optim,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.info.distributed),
        )
        extras = ckpt_io.read_trainer_extras(path)
        self.scheduler.load_state_dict(extras["scheduler"])
        if state.world == self.info.world:
            ckpt_io.set_rng_state(extras["rng"][self.info.rank])
        else:
            self._say(f"warning: {path.name} was written by {state.world} processes, now {self.info.world}: "
                      "random states are not restored and per-step batches are regrouped")
        self.step = state.step
        self.position = DataPosition(state.epoch, state.batch_index)
        self._say(f"resumed from {path} (step {state.step})")

    # ---- loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, info = self.cfg, self.info
        last_step = min(cfg.steps, cfg.stop_after or cfg.steps)
        accum = cfg.grad_accum
        keys = _RankKeys(self.schedule, self.position, last_step - self.step, info, accum)
        loader = iter(_loader(self.train_data, keys, cfg.workers, info))
        progress = _progress(info, total=cfg.steps, initial=self.step)
        if self.step == 0 and cfg.eval_every:
            self._log_eval()
        window = _Window()
        logged = {}
        while self.step < last_step:
            log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == last_step
            step_start = time.perf_counter()
            micro = []
            for _ in range(accum):
                t0 = time.perf_counter()
                micro.append(next(loader))
                window.data_wait += time.perf_counter() - t0
            _, self.position = self.schedule.advance(self.position, info.world * accum)
            targets = all_reduce_sum(torch.tensor(float(sum(b["targets"] for b in micro))), info).item()
            sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss, kd, ce: sums over targets
            for a, batch in enumerate(micro):
                with self._grad_sync(a == accum - 1):
                    sums += self._micro_step(batch, max(targets, 1.0), with_parts=log_now)
                window.tokens += batch["tokens"]
            grad_norm = self._clip()
            self.optimizer.step()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            window.targets += targets
            window.busy += time.perf_counter() - step_start
            progress.update(1)
            if log_now:
                logged = self._log_train(sums, targets, lr, grad_norm, window)
                progress.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{lr:.2e}")
                window = _Window()
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                self._log_eval()
            done = self.step == last_step
            if done or (cfg.save_every and self.step % cfg.save_every == 0):
                self._save(final=done and self.step == cfg.steps)
        progress.close()
        return logged

    def _micro_step(self, batch: dict, global_targets: float, *, with_parts: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch.

        Returns:
            float64 [3] on the device: sums over its targets of the loss, and (only when `with_parts`)
            of its KD and CE parts.
        """
        cfg, dev = self.cfg, self.info.device
        b = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with self._autocast():
            logits = self.module(b["input_ids"], b["attention_mask"], b["rows"])
        if self._sampled_tau is not None:
            loss, parts = self._sampled(b).loss(logits, b["labels"], alpha=cfg.alpha, temperature=cfg.temperature,
                                                with_parts=with_parts)
        else:
            result = self.loss_fn(logits, b["topk_idx"], b["topk_logp"], b["labels"], tail=cfg.tail, alpha=cfg.alpha,
                                  temperature=cfg.temperature, divergence=cfg.divergence, beta=cfg.beta,
                                  reduction="sum", return_parts=with_parts)
            loss = result.loss if with_parts else result
            parts = torch.stack([result.kd, result.ce]) if with_parts else None  # from the same kernel pass
        # DDP and FSDP average gradients over ranks; scaling by world makes the result sum / global count.
        (loss * (self.info.world / global_targets)).backward()
        out = torch.zeros(3, dtype=torch.float64, device=dev)
        out[0] = loss.detach()
        if with_parts:
            out[1:] = parts
        return out

    def _sampled(self, b: dict) -> SampledTargets:
        return SampledTargets(b, proposal_temperature=self._sampled_tau,
                              loss_fn=sampled_kl_reference if self.cfg.loss_impl == "reference" else sampled_kl)

    def _clip(self) -> torch.Tensor:
        """Clips the global gradient norm; returns the norm before clipping (a 0-dim tensor)."""
        norm = torch.nn.utils.clip_grad_norm_(
            self.module.parameters(), self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        )
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor

    def _grad_sync(self, sync: bool):
        if sync or not self.info.distributed:
            return contextlib.nullcontext()
        if hasattr(self.module, "no_sync"):  # DDP
            return self.module.no_sync()
        return _fsdp_no_sync(self.module)

    def _autocast(self):
        if self.info.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- evaluation and logging --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean KD loss (T=1) and top-1 agreement with the teacher on the held-out slice."""
        info = self.info
        mine = list(range(info.rank, len(self.eval_batches), info.world))
        rounds = math.ceil(len(self.eval_batches) / info.world)
        # Every rank runs the same number of forwards (FSDP gathers weights collectively); padding
        # rounds repeat batch 0 and are not counted.
        keys = mine + [0] * (rounds - len(mine))
        sums = torch.zeros(3, dtype=torch.float64)  # kd, agree, targets
        self.module.eval()
        for j, batch in enumerate(_loader(self.eval_data, keys, self.cfg.workers, info)):
            b = {k: v.to(info.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self._autocast():
                logits = self.module(b["input_ids"], b["attention_mask"], b["rows"])
            if j >= len(mine) or b["targets"] == 0:
                continue
            if self._sampled_tau is not None:
                targets = self._sampled(b)
                teacher_top1, kd = targets.teacher_top1(), targets.eval_kd(logits)
            else:
                teacher_top1 = b["topk_idx"].gather(1, b["topk_logp"].argmax(1, keepdim=True)).squeeze(1).long()
                kd = self.loss_fn(logits, b["topk_idx"], b["topk_logp"], None, tail=self.cfg.tail, reduction="sum")
            sums[0] += float(kd)
            sums[1] += float((logits.argmax(-1) == teacher_top1).sum())
            sums[2] += b["targets"]
        self.module.train()
        sums = all_reduce_sum(sums, info)
        n = max(sums[2].item(), 1.0)
        return {"eval_kd": sums[0].item() / n, "eval_top1": sums[1].item() / n, "eval_targets": int(sums[2].item()),
                "eval_samples": len(self.eval_ids)}

    def _log_eval(self) -> None:
        result = self.evaluate()
        if self.info.is_main:
            self._metrics.eval({"step": self.step, **result})
            self._say(f"step {self.step}: held-out KD {result['eval_kd']:.4f}, "
                      f"top-1 agreement {result['eval_top1']:.3f}")

    def _log_train(
        self, sums: torch.Tensor, targets: float, lr: float, grad_norm: torch.Tensor, window: "_Window"
    ) -> dict:
        sums = all_reduce_sum(sums, self.info).cpu()
        tokens = all_reduce_sum(torch.tensor(float(window.tokens)), self.info).item()
        elapsed = max(window.busy, 1e-9)  # training steps only: evaluation and checkpoint time excluded
        n = max(targets, 1.0)
        record = {
            "step": self.step,
            "loss": sums[0].item() / n,
            "kd": sums[1].item() / n,
            "ce": sums[2].item() / n,
            "divergence": self.cfg.divergence,
            "beta": self.cfg.beta,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "targets": int(targets),
            "tokens_per_s": tokens / elapsed,
            "targets_per_s": window.targets / elapsed,
            "data_wait": window.data_wait / elapsed,
            "peak_mem_mib": _peak_memory_mib(self.info.device),
        }
        if self.info.is_main:
            self._metrics.train(record)
        return record

    # ---- checkpoints -------------------------------------------------------------------------
    def _save(self, *, final: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.module, options=opts)
        optim_state = get_optimizer_state_dict(self.module, self.optimizer, options=opts)
        rngs = gather_objects(ckpt_io.rng_state(), self.info)
        if self.info.is_main:
            hf_state = {k.removeprefix("model."): v for k, v in model_state.items()}
            hf_state = {k: v for k, v in hf_state.items() if k not in self._tied}
            state = ckpt_io.TrainState(step=self.step, epoch=self.position.epoch, batch_index=self.position.index,
                                       world=self.info.world, store_samples=self.store_samples,
                                       config=self.cfg.to_dict())
            path = ckpt_io.save_checkpoint(
                self.out, state, write_model=lambda d: self._write_hf_and_config(d, hf_state), optimizer_state=optim_state,
                scheduler_state=self.scheduler.state_dict(), rng_states=rngs, keep=self.cfg.keep_checkpoints,
            )
            self._say(f"saved {path}")
            if final:
                tmp, dest = self.out / ".tmp-final", self.out / "final"
                shutil.rmtree(tmp, ignore_errors=True)
                self._write_hf(tmp, hf_state)
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
                self._say(f"final model: {dest}")
        barrier(self.info)

    def _write_hf_and_config(self, directory: Path, state: dict) -> None:
        self._write_hf(directory, state)
        write_config_yaml(directory / "config.yaml", self.cfg)

    def _write_hf(self, directory: Path, state: dict) -> None:
        self.hf_model.save_pretrained(directory, state_dict=state)
        self.tokenizer.save_pretrained(directory)

    def _parallelism(self) -> str:
        if not self.info.distributed:
            return ""
        return ", FSDP" if self.cfg.fsdp else ", DDP"

    def cleanup(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        shutdown(self.info)

    def _say(self, message: str) -> None:
        if self.info.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)


class _RankKeys:
    """The DataLoader's sampler: this rank's batch positions for the rest of the run, produced lazily."""

    def __init__(self, schedule: BatchSchedule, start: DataPosition, steps: int, info, accum: int):
        self._args = (schedule, start, steps, info.world, accum, info.rank)

    def __iter__(self):
        schedule, start, steps, world, accum, rank = self._args
        return schedule.rank_positions(start, steps, world, accum, rank)


class _Window:
    """Counters since the last log line; `busy` is the wall time of the training steps themselves."""

    def __init__(self):
        self.busy = 0.0
        self.data_wait = 0.0
        self.tokens = 0
        self.targets = 0.0


class _MetricsLog:
    """OUT/metrics.jsonl (one object per logged training step) and OUT/eval.jsonl (one per evaluation).
    On resume, records after the checkpoint's step are dropped: those steps are run again."""

    def __init__(self, out: Path, *, keep_through_step: int | None):
        out.mkdir(parents=True, exist_ok=True)
        self._files = {}
        for name in ("metrics", "eval"):
            path = out / f"{name}.jsonl"
            if keep_through_step is None:
                path.write_text("")
            elif path.exists():
                lines = path.read_text().splitlines()
                kept = [ln for ln in lines if ln and json.loads(ln)["step"] <= keep_through_step]
                path.write_text("".join(ln + "\n" for ln in kept))
            self._files[name] = path.open("a")

    def train(self, record: dict) -> None:
        self._write("metrics", record)

    def eval(self, record: dict) -> None:
        self._write("eval", record)

    def _write(self, name: str, record: dict) -> None:
        self._files[name].write(json.dumps(record) + "\n")
        self._files[name].flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()


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
    import numpy as np

    return np.concatenate([np.diff(store.shard(s).token_offsets) for s in range(store.num_shards)]).tolist()


def _loss_function(impl: str):
    if impl == "reference":
        from kdengine.losses.reference import sparse_kl_reference

        return sparse_kl_reference
    from kdengine.losses import sparse_kl

    return sparse_kl


def _loader(dataset: Dataset, keys: list, workers: int, info) -> DataLoader:
    return DataLoader(
        dataset, batch_size=None, sampler=keys, num_workers=workers, pin_memory=info.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def _progress(info, *, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not info.is_main, dynamic_ncols=True)


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
