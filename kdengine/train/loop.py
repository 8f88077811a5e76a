"""The training run, top to bottom: inputs and guard -> data -> student -> optimizer -> resume ->
loop (micro-steps -> clip -> step -> log / eval / checkpoint) -> final model.

Runs alone or under torchrun; only rank 0 logs and writes files. The loss of a step is the sum of the
per-target losses over every micro-batch on every rank divided by the global target count, so it does
not depend on how the global batch is split into ranks and micro-batches.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.utils.data import DataLoader, Dataset

from kdengine.locks import LockHeld, hold_lock
from kdengine.train import checkpoint as ckpt_io
from kdengine.durable import fsync_path
from kdengine.train import hidden as feature_kd
from kdengine.train.checkpoint import fsync_tree
from kdengine.train.config import TrainConfig, write_config_yaml
from kdengine.train.data import BatchSchedule, DataPosition, plan_batches, split_heldout
from kdengine.train.distributed import all_reduce_sum, barrier, init_distributed, shutdown, wrap_model
from kdengine.train.errors import TrainError
from kdengine.train.lora import apply_lora, load_adapter, save_adapter, write_merged
from kdengine.train.model import TargetLogits, check_student_dir, decoder_layers, load_student, tied_aliases
from kdengine.train.optim import build_optimizer, build_scheduler
from kdengine.train.reporting import open_sinks, plot_curves
from kdengine.train.sources import OnlineSource, StoreFailure, StoreSource


def run(cfg: TrainConfig) -> dict:
    """Trains per `cfg`; returns the last logged metrics (rank 0; other ranks get {}).

    Raises:
        TrainError: missing store or student, tokenizer/vocab mismatch, a non-resumable --out.
    """
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    except (OSError, SafetensorError) as exc:  # disk full, read-only filesystem, ... writing the run directory
        trainer.remove_temporaries()
        where = getattr(exc, "filename", None) or cfg.out
        reason = getattr(exc, "strerror", None) or str(exc).removeprefix("Error while serializing: ")
        raise TrainError(f"{where}: cannot write ({reason}); free space or choose another --out, then run again "
                         "(with --resume if checkpoints were written)") from None
    except BaseException:
        trainer.remove_temporaries()
        raise
    finally:
        trainer.cleanup()


def _batches(loader):
    """The loader's batches; a store error inside a worker is raised here as the one-line StoreError."""
    from kdengine.store import StoreError

    for batch in loader:
        if isinstance(batch, StoreFailure):
            raise StoreError(batch.message)
        yield batch


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.info = init_distributed()
        self.step = 0
        self.position = DataPosition(0, 0)
        self._warned_data_wait = False
        self._metrics = None
        self._lock = None
        self._created_out = False
        self._loss_checked = False  # the loss validates its inputs until one step has run
        self._noted_unfusable_targets = False
        self._fused_last = False  # whether the latest micro-batch ran the fused head

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        check_student_dir(cfg.student)
        from transformers import AutoConfig, AutoTokenizer

        self.source = self._open_source()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student)
        student_config = AutoConfig.from_pretrained(cfg.student)
        self.source.check_student(cfg.student, self.tokenizer, student_config.vocab_size)
        pairs = self._hidden_pairs(student_config)
        store = getattr(self.source, "store", None)
        self.store_identity = store.identity if store is not None else f"online teacher {cfg.teacher} on {cfg.data}"
        self._claim_out()
        resume_from = self._resume_point(self.source.num_samples)

        lengths = self.source.lengths
        self.store_samples = self.source.num_samples
        try:
            train_ids, self.eval_ids = split_heldout(self.source.num_samples, cfg.eval_fraction, cfg.seed)
        except ValueError as exc:
            raise TrainError(f"{self.source.description}: {exc}; use more samples or lower --eval-fraction") from None
        self.schedule = BatchSchedule(train_ids, lengths, cfg.batch_tokens, cfg.seed)
        self.eval_batches = plan_batches(self.eval_ids, lengths, cfg.batch_tokens, seed=None)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.train_data = self.source.batches(self.schedule.batches_at, pad_id)
        self.eval_data = self.source.batches(self.eval_batches.__getitem__, pad_id)

        self.sharded = cfg.fsdp and info.distributed
        full_resume = resume_from is not None and not self.sharded and not cfg.lora_rank
        self.hf_model = load_student(resume_from if full_resume else cfg.student,
                                     grad_checkpointing=cfg.grad_checkpointing)
        self._tied = tied_aliases(self.hf_model)
        self.peft_model = None
        if cfg.lora_rank:
            self.peft_model = apply_lora(self.hf_model, cfg, decoder_layers(self.hf_model))
            if resume_from is not None and not self.sharded:
                load_adapter(self.peft_model, resume_from / "adapter")
        self.hf_model.to(info.device)
        if pairs:
            self.source.capture_hidden([t for _, t in pairs])
            head = feature_kd.StudentWithHidden(self.hf_model, pairs, self.source.hidden_size).to(info.device)
            if resume_from is not None and not self.sharded:
                feature_kd.load_projections(head, resume_from)
        else:
            head = TargetLogits(self.hf_model)
        probe = self.source.probe_ids(train_ids[0])[:16][None].to(info.device)
        head.check_matches_full_forward(probe)
        self._feature_kd = bool(pairs)
        self.fused_head = self._head_fuses(head, probe)
        self.module = wrap_model(head, decoder_layers(self.hf_model), info, fsdp=cfg.fsdp)
        self.module.train()
        self.optimizer = build_optimizer(self.module, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        if resume_from is not None:
            self._load_training_state(resume_from)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_config_yaml(self.out / "config.yaml", cfg)
            sinks = open_sinks(cfg.report_to, self.out, cfg.to_dict(), resume=resume_from is not None)
            self._metrics = _MetricsLog(self.out, keep_through_step=self.step if resume_from else None, sinks=sinks)
            self._say(
                f"{len(train_ids)} training samples, {len(self.eval_ids)} held out (seed {cfg.seed}); "
                f"{info.world} process(es) on {info.device.type}{self._parallelism()}; "
                f"step {self.step} of {cfg.steps}"
            )
        store = getattr(self.source, "store", None)  # an online teacher has no store to decode
        self.decode_rate = _decode_rate(store, train_ids[:32]) if store is not None else None
        if info.is_main and self.decode_rate is not None:
            self._say(
                f"data: {cfg.workers} decode worker(s) (--workers); one decodes ~{self.decode_rate:,.0f} target "
                f"positions/s on this machine (measured now), so they feed up to ~"
                f"{self.decode_rate * max(cfg.workers, 1):,.0f}/s; time a step waits shows as data_wait in the log"
            )

    def _head_fuses(self, head, probe: torch.Tensor) -> bool:
        """Whether the loss may take the head's input and weight (--fused-head, default on where the head
        is a linear map the fused op reproduces; see `TargetLogits.fused_head_problem`)."""
        if self.cfg.fused_head is False:
            return False
        problem = head.fused_head_problem(probe)
        if problem is not None:
            self._fused_head_unavailable(problem)
        return problem is None

    def _fused_head_unavailable(self, reason: str) -> None:
        """Falls back to the logits with a note, or refuses when --fused-head was asked for explicitly.

        Raises:
            TrainError: --fused-head was given.
        """
        if self.cfg.fused_head:
            raise TrainError(f"--fused-head: {reason}; drop --fused-head to compute the logits instead")
        self._say(f"fused head off: {reason}; computing the [N, V] logits instead")

    def _open_source(self):
        """The targets' source: the store, or the online teacher (on --teacher-device, else the student's)."""
        cfg = self.cfg
        if cfg.store is not None:
            return StoreSource(cfg.store, tail=cfg.tail, temperature=cfg.temperature, loss_impl=cfg.loss_impl,
                               divergence=cfg.divergence, beta=cfg.beta, approx_tempered_tail=cfg.approx_tempered_tail)
        device = torch.device(cfg.teacher_device) if cfg.teacher_device else self.info.device
        return OnlineSource(teacher=cfg.teacher, data=cfg.data, device=device, dtype=cfg.teacher_dtype,
                            chat=cfg.chat, max_length=cfg.max_length, top_k=cfg.online_top_k, tail=cfg.tail,
                            temperature=cfg.temperature, loss_impl=cfg.loss_impl, divergence=cfg.divergence, beta=cfg.beta,
                            progress=self.info.is_main)

    def _hidden_pairs(self, student_config) -> list[tuple[int, int]]:
        """The (student layer, teacher layer) pairs of feature KD; [] when --hidden-weight is 0."""
        if self.cfg.hidden_weight == 0:
            return []
        return feature_kd.layer_pairs(self.cfg.hidden_layers, student_layers=student_config.num_hidden_layers,
                                      teacher_layers=self.source.num_layers,
                                      recorded_map=getattr(student_config, "kdengine_layer_map", None))

    def _claim_out(self) -> None:
        """Creates --out and takes its lock for the life of the process (rank 0); every rank fails if it
        cannot."""
        problem = ""
        if self.info.is_main:
            try:
                if self.out.exists() and not self.out.is_dir():
                    raise TrainError(f"--out {self.out} is a file, not a directory; choose another --out")
                self._created_out = not self.out.exists()
                try:
                    self.out.mkdir(parents=True, exist_ok=True)
                    self._lock = hold_lock(self.out / ".lock", f"a training run writing to {self.out}")
                except LockHeld as exc:
                    raise TrainError(str(exc)) from None
                except OSError as exc:
                    raise TrainError(f"--out {self.out}: cannot create the run directory or its lock "
                                     f"({exc.strerror or exc}); choose a writable --out") from None
            except TrainError as exc:
                problem = str(exc)
        failed = all_reduce_sum(torch.tensor([1.0 if problem else 0.0]), self.info).item()
        if problem:
            raise TrainError(problem)
        if failed:
            raise TrainError(f"rank 0 could not claim --out {self.out} (see its message)")

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
        if state.store_identity != self.store_identity or state.store_samples != store_samples:
            raise TrainError(f"{existing} was trained on another store (identity {state.store_identity[:16]}..., "
                             f"{state.store_samples} samples); {self.source.description} has identity "
                             f"{self.store_identity[:16]}... ({store_samples} samples): the held-out split and "
                             "batch order would change; resume with the original store or start a new --out")
        changed = ckpt_io.data_order_changes(state.config, self.cfg.to_dict())
        if changed:
            raise TrainError(f"{existing}: {'; '.join(changed)}: these decide the batch order and the held-out "
                             "split, so resuming would mix data and leak held-out samples into training; resume "
                             "with the checkpoint's values or start a new --out")
        if self.cfg.fsdp and self.info.distributed and state.world != self.info.world:
            raise TrainError(f"{existing} holds FSDP shards of {state.world} processes, now {self.info.world}: "
                             f"resume with --nproc_per_node {state.world} (see README: changing the world size)")
        if state.sharded and not (self.cfg.fsdp and self.info.distributed):
            raise TrainError(f"{existing} holds FSDP shards of {state.world} processes; resume under torchrun "
                             f"with --nproc_per_node {state.world} --fsdp")
        if state.step > self.cfg.steps:
            raise TrainError(f"{existing} is at step {state.step}, past --steps {self.cfg.steps}; "
                             f"raise --steps to at least {state.step}")
        return existing

    def _load_training_state(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        from kdengine.train.state_files import load_state

        state = ckpt_io.read_train_state(path)
        for key, default in (("divergence", "fkl"), ("beta", 0.5)):  # a run's loss is one objective
            saved, now = state.config.get(key, default), getattr(self.cfg, key)
            if saved != now:
                raise TrainError(f"{path}: the run was trained with --{key} {saved}, this resume asks for {now}; "
                                 f"resume with --{key} {saved} or start a new --out")
        for line in ckpt_io.config_drift(state.config, self.cfg.to_dict()):
            self._say(f"warning: config changed since {path.name}: {line}")
        same_world = state.world == self.info.world
        mine = load_state(path, ckpt_io.rank_state_name(self.info.rank)) if same_world else None
        if self.sharded:
            opts = StateDictOptions(full_state_dict=False, strict=self.peft_model is None)
            set_model_state_dict(self.module, _from_local(mine["model"], self._shard_templates()), options=opts)
            optim = _from_local(mine["optimizer"], self._shard_templates())
        else:
            optim = load_state(path, "optimizer")
        set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=optim,
                                 options=StateDictOptions(full_state_dict=not self.sharded))
        try:
            self.scheduler.load_state_dict(load_state(path, "scheduler"))
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainError(f"{path / 'scheduler.json'}: not a scheduler state ({exc})") from None
        if same_world:
            ckpt_io.set_rng_state(mine["rng"])
        else:
            self._say(f"warning: {path.name} was written by {state.world} processes, now {self.info.world}: "
                      "random states are not restored and per-step batches are regrouped")
        self.step = state.step
        self.position = DataPosition(state.epoch, state.batch_index)
        self._say(f"resumed from {path} (step {state.step})")

    def _shard_templates(self) -> dict:
        """Parameter name -> this rank's DTensor of it (mesh, placements, global shape)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=_sharded_options())

    # ---- loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, info = self.cfg, self.info
        if self.step >= cfg.steps:  # resumed after the last step: only final/ may be missing
            if (self.out / "final").is_dir():
                self._say(f"the run is complete (step {self.step} of {cfg.steps}, {self.out / 'final'} exists); "
                          "raise --steps to train further")
            else:
                self._export_final()
            return {}
        last_step = min(cfg.steps, cfg.stop_after or cfg.steps)
        accum = cfg.grad_accum
        keys = _RankKeys(self.schedule, self.position, last_step - self.step, info, accum)
        loader = _batches(_loader(self.train_data, keys, cfg.workers, info, self._lock))
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
            sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, kd, ce, hidden: sums over targets
            for a, batch in enumerate(micro):
                with self._grad_sync(a == accum - 1):
                    sums += self._micro_step(batch, max(targets, 1.0), with_parts=log_now)
                window.tokens += batch["tokens"]
            grad_norm = self._clip()
            self.optimizer.step()
            self._loss_checked = True  # this step's inputs passed the loss's data checks
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
        if info.is_main:
            self._say(f"curves: {plot_curves(self.out)}")
        return logged

    def _micro_step(self, batch: dict, global_targets: float, *, with_parts: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch.

        Returns:
            float64 [4] on the device: sums over its targets of the loss, (only when `with_parts`) of its
            KD and CE parts, and of the feature-KD loss (0 without it). The loss includes
            --hidden-weight times the feature-KD loss.
        """
        cfg, dev = self.cfg, self.info.device
        b = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        targets = self.source.targets(b)
        validate = not self._loss_checked
        inputs = (b["input_ids"], b["attention_mask"], b["rows"])
        self._fused_last = self._targets_fuse(targets)
        if self._fused_last:  # the loss runs inside the module's forward, on the head's input and weight
            with self._autocast():
                out = self.module(*inputs, self._fused_loss(targets, b["labels"], with_parts, validate))
            (loss, parts), hidden = _split_outputs(out, self._feature_kd)
        else:
            with self._autocast():
                logits, hidden = _split_outputs(self.module(*inputs), self._feature_kd)
            loss, parts = targets.loss(logits, b["labels"], alpha=cfg.alpha, temperature=cfg.temperature,
                                       with_parts=with_parts, validate=validate)
        out = torch.zeros(4, dtype=torch.float64, device=dev)
        if hidden is not None:
            feature = feature_kd.hidden_loss_rows(hidden, targets.hidden, cfg.hidden_loss).sum()
            loss = loss + cfg.hidden_weight * feature
            out[3] = feature.detach()
        # DDP and FSDP average gradients over ranks; scaling by world makes the result sum / global count.
        (loss * (self.info.world / global_targets)).backward()
        out[0] = loss.detach()
        if parts is not None:
            out[1:3] = parts
        return out

    def _targets_fuse(self, targets) -> bool:
        """Whether this micro-batch runs the fused head: the head allows it and the targets have a fused
        loss (`targets.can_fuse`; not dense online KD, a sampled store or --loss-impl reference)."""
        if not self.fused_head:
            return False
        if not targets.can_fuse and not self._noted_unfusable_targets:
            self._noted_unfusable_targets = True
            self._fused_head_unavailable(f"{type(targets).__name__} has no fused-head loss (dense online KD, "
                                         "a sampled-target store and --loss-impl reference take logits)")
        return targets.can_fuse

    def _fused_loss(self, targets, labels: torch.Tensor, with_parts: bool, validate: bool):
        """The training module's `fused_loss`: (hidden, weight, bias, softcap) -> (loss, parts)."""
        cfg = self.cfg

        def loss(hidden, weight, bias, softcap):
            return targets.loss_linear(hidden, weight, labels, alpha=cfg.alpha, temperature=cfg.temperature,
                                       with_parts=with_parts, bias=bias, softcap=softcap, validate=validate)

        return loss

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
        for j, batch in enumerate(_batches(_loader(self.eval_data, keys, self.cfg.workers, info, self._lock))):
            b = {k: v.to(info.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self._autocast():
                logits, _ = _split_outputs(self.module(b["input_ids"], b["attention_mask"], b["rows"]),
                                           self._feature_kd)
            if j >= len(mine) or b["targets"] == 0:
                continue
            targets = self.source.targets(b)
            sums[0] += float(targets.eval_kd(logits))
            sums[1] += float((logits.argmax(-1) == targets.teacher_top1()).sum())
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
            "fused_head": self._fused_last,
            **({"hidden": sums[3].item() / n} if self.cfg.hidden_weight else {}),
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
            warning = None if self._warned_data_wait else data_wait_warning(
                record, self.decode_rate, self.cfg.workers, getattr(getattr(self.source, "store", None), "codec", None))
            if warning:
                self._warned_data_wait = True
                self._say(warning)
        return record

    # ---- checkpoints -------------------------------------------------------------------------
    def _save(self, *, final: bool) -> None:
        """Writes a checkpoint (every rank its own files) and, at the end of the run, final/."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from kdengine.train.state_files import save_state

        info = self.info
        tmp = ckpt_io.prepare_staging(self.out, self.step) if info.is_main else ckpt_io.staging_dir(self.out, self.step)
        barrier(info)
        mine = {"rng": ckpt_io.rng_state()}
        hf_state = None
        if self.sharded:  # each rank its own shards: nothing is gathered
            opts = _sharded_options()
            mine["model"] = _to_local(self._trained_part(get_model_state_dict(self.module, options=opts)))
            mine["optimizer"] = _to_local(get_optimizer_state_dict(self.module, self.optimizer, options=opts))
        else:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.module, options=opts)
            hf_state, projections = self._hf_state(model_state), feature_kd.projection_state(model_state)
            optim_state = get_optimizer_state_dict(self.module, self.optimizer, options=opts)
        written = save_state(tmp, ckpt_io.rank_state_name(info.rank), mine)
        for path in written:
            fsync_path(path)
        if info.is_main:
            if hf_state is not None:
                if self.peft_model is not None:
                    save_adapter(self.peft_model, tmp / "adapter", hf_state)
                else:
                    self._write_hf(tmp, hf_state)
                feature_kd.save_projections(tmp, projections)
                save_state(tmp, "optimizer", optim_state)
            save_state(tmp, "scheduler", self.scheduler.state_dict())
            write_config_yaml(tmp / "config.yaml", self.cfg)
        barrier(info)  # every rank's files are on disk
        if info.is_main:
            state = ckpt_io.TrainState(step=self.step, epoch=self.position.epoch, batch_index=self.position.index,
                                       world=info.world, store_samples=self.store_samples,
                                       store_identity=self.store_identity, sharded=self.sharded,
                                       config=self.cfg.to_dict())
            path = ckpt_io.commit_checkpoint(self.out, tmp, state, keep=self.cfg.keep_checkpoints)
            self._say(f"saved {path}")
        barrier(info)
        if final:
            self._export_final(hf_state)

    def _trained_part(self, model_state: dict) -> dict:
        """The entries of a model state dict that training changes: all of them, or LoRA's adapters."""
        if self.peft_model is None:
            return model_state
        trained = {name for name, p in self.module.named_parameters() if p.requires_grad}
        return {k: v for k, v in model_state.items() if k in trained}

    def _hf_state(self, model_state: dict) -> dict:
        """A full state dict of the training module in HF names, tied aliases and feature-KD projections
        dropped."""
        projections = feature_kd.projection_state(model_state)
        hf_state = {k.removeprefix("model."): v for k, v in model_state.items() if k not in projections}
        return {k: v for k, v in hf_state.items() if k not in self._tied}

    def _export_final(self, hf_state: dict | None = None) -> None:
        """OUT/final/: the trained student as a plain HF directory (with FSDP the one full gather, to
        rank 0's CPU memory)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if hf_state is None:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            hf_state = self._hf_state(get_model_state_dict(self.module, options=opts))
        if self.info.is_main:
            tmp, dest = self.out / ".tmp-final", self.out / "final"
            shutil.rmtree(tmp, ignore_errors=True)
            if self.peft_model is not None:
                write_merged(self.cfg.student, self.cfg, decoder_layers, hf_state, tmp)
                self.tokenizer.save_pretrained(tmp)
            else:
                self._write_hf(tmp, hf_state)
            fsync_tree(tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            fsync_path(self.out)
            self._say(f"final model: {dest}")
        barrier(self.info)

    def _write_hf(self, directory: Path, state: dict) -> None:
        self.hf_model.save_pretrained(directory, state_dict=state)
        self.tokenizer.save_pretrained(directory)

    def _parallelism(self) -> str:
        mode = ""
        if self.peft_model is not None:
            trained = sum(p.numel() for p in self.hf_model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.hf_model.parameters())
            targets = ",".join(sorted(self.peft_model.peft_config["default"].target_modules))
            mode = f"; LoRA rank {self.cfg.lora_rank} on {targets}: {trained:,} of {total:,} parameters trained"
        if not self.info.distributed:
            return mode
        return (", FSDP" if self.cfg.fsdp else ", DDP") + mode

    def remove_temporaries(self) -> None:
        """After a failure (rank 0): staging directories and half-written files go; complete checkpoints
        stay. A fresh run that wrote no checkpoint leaves no run directory behind."""
        if not self.info.is_main or self._lock is None:
            return
        ckpt_io.remove_partial_checkpoints(self.out)
        for stale in [self.out / ".tmp-final", *self.out.glob(".*.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        if self._created_out and ckpt_io.newest_checkpoint(self.out) is None:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            self._lock.release()
            self._lock = None
            shutil.rmtree(self.out, ignore_errors=True)

    def cleanup(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._lock is not None:
            self._lock.release()
        shutdown(self.info)
        # FSDP/DDP state and the optimizer keep the (destroyed) gloo group and its finished work alive;
        # left to interpreter teardown, a gloo thread freeing their tensors can abort the process
        # ("terminate called without an active exception"), so they go now, while Python is whole.
        self.module = self.optimizer = self.scheduler = self.hf_model = self.peft_model = None
        gc.collect()

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

    def __init__(self, out: Path, *, keep_through_step: int | None, sinks: list):
        out.mkdir(parents=True, exist_ok=True)
        self._sinks = sinks
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
        for sink in self._sinks:
            sink.log("train" if name == "metrics" else "eval", record)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def _split_outputs(out, feature_kd: bool) -> tuple:
    """(logits or the fused loss's result, projected hidden states or None): the training module returns
    the pair with feature KD."""
    return out if feature_kd else (out, None)


def data_wait_warning(record: dict, decode_rate: float | None, workers: int, codec: str | None) -> str | None:
    """The one-time warning for a logged step window that waited for data over 1% of its time (None when
    it did not, or when there is no store to decode: an online teacher's wait is the teacher)."""
    if decode_rate is None or record["data_wait"] <= 0.01:
        return None
    faster = ("; or store with --codec sqrt, which decodes 4-5x faster in ~20% more bytes (README, store section)"
              if codec == "sqrt_ac" else "")
    return (f"warning: step {record['step']}: steps waited for data {record['data_wait']:.1%} of the time "
            f"(consuming {record['targets_per_s']:,.0f} target positions/s); each decode worker adds "
            f"~{decode_rate:,.0f}/s: raise --workers (now {workers}){faster}")


def _decode_rate(store, sample_ids) -> float:
    """Target positions per second of CPU time that one process decodes from `store` (batch decode,
    as a DataLoader worker does), measured on `sample_ids`."""
    start = time.thread_time()
    positions = sum(len(s["positions"]) for s in store.samples(list(sample_ids)))
    return positions / max(time.thread_time() - start, 1e-6)


def _loader(dataset: Dataset, keys: list, workers: int, info, lock) -> DataLoader:
    return DataLoader(
        dataset, batch_size=None, sampler=keys, num_workers=workers, pin_memory=info.device.type == "cuda",
        prefetch_factor=4 if workers else None, worker_init_fn=_DropInheritedLock(lock),
        # its own generator: creating an iterator must not draw from the global RNG, whose stream
        # (LoRA dropout) a resumed run has to continue exactly
        generator=torch.Generator().manual_seed(0),
    )


class _DropInheritedLock:
    """A forked DataLoader worker inherits the run-directory lock's descriptor; it closes its copy, so
    that a killed trainer's lock is free as soon as the trainer is gone, not when its workers notice."""

    def __init__(self, lock):
        self._fd = getattr(lock, "_fd", None)

    def __call__(self, worker_id: int) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _progress(info, *, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not info.is_main, dynamic_ncols=True)


def _sharded_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=False)


_LOCAL = "__local_shard__"


def _to_local(tree):
    """A sharded state dict with every DTensor replaced by this rank's local shard (for saving)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return {_LOCAL: tree.to_local().cpu()}
    if isinstance(tree, dict):
        return {k: _to_local(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_local(v) for v in tree)
    return tree.cpu() if torch.is_tensor(tree) else tree


def _from_local(tree, templates: dict, fqn: str | None = None):
    """Inverse of `_to_local`: local shards back into DTensors laid out like the parameter they belong
    to (`templates`: parameter name -> its DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, dict) and set(tree) == {_LOCAL}:
        like = templates.get(fqn)
        if like is None:
            raise TrainError(f"a checkpoint shard holds {fqn!r}, which this model does not have")
        local = tree[_LOCAL].to(like.device)
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())
    if isinstance(tree, dict):
        return {k: _from_local(v, templates, k if k in templates else fqn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_from_local(v, templates, fqn) for v in tree)
    return tree


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
