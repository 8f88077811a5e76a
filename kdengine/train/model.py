"""The student as the loop sees it: loaded from an HF directory, and wrapped so that its output head
runs only on the rows that carry a teacher target."""
from __future__ import annotations

from pathlib import Path

import torch

from kdengine.train.errors import TrainError


def load_student(path: str | Path, *, grad_checkpointing: bool) -> torch.nn.Module:
    """Loads a causal LM in float32 (the master weights; autocast lowers the compute precision).

    Raises:
        TrainError: `path` is not a directory with a config.json, or its files cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    check_student_dir(path)
    try:  # safetensors only: never a pickled pytorch_model.bin
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except Exception as exc:  # transformers reports damaged files with many exception types
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise TrainError(f"{path}: cannot load the model ({type(exc).__name__}: {reason}); if this is a checkpoint, "
                         "delete it to resume from the one before it") from None
    model.config.use_cache = False
    if grad_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def check_student_dir(path: str | Path) -> None:
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json (not an HF model directory)"
        raise TrainError(
            f"student {path} {what}; make one with `kdengine make-student --teacher TEACHER --layers N --out {path}` "
            "or pass a local HF causal-LM directory"
        )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers (one FSDP unit each)."""
    depth = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return module
    raise TrainError(f"cannot find the decoder layers of {type(model).__name__} (no ModuleList of length {depth})")


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier parameter (a tied output head).

    Sharded state dicts gather each name into its own tensor, so without this list a tied head would be
    saved twice."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    return aliases


class HeadNotFusable(Exception):
    """The output head is not a linear map (+ bias, softcap) that `sparse_kl_linear` can take; str(exc) says why."""


def linear_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       softcap: float | None) -> torch.Tensor:
    """hidden @ weight.T (+ bias), then softcap * tanh(logits / softcap): the head as `sparse_kl_linear`
    computes it."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def head_weights(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) with head(x) == x @ weight.T + bias.

    An nn.Linear gives its own parameters (a tied head: the embedding matrix itself, so its gradient
    adds into the one tensor); a peft LoRA linear gives base + scaling * B @ A, formed at each call so
    that gradients reach A and B.

    Raises:
        HeadNotFusable: any other module, or LoRA with dropout, a variant (DoRA) or its own bias.
    """
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        LoraLinear = ()
    if not isinstance(head, LoraLinear):
        raise HeadNotFusable(f"the output head is a {type(head).__name__}, not an nn.Linear or a LoRA linear")
    base = head.get_base_layer()
    if type(base) is not torch.nn.Linear or head.merged or head.disable_adapters:
        raise HeadNotFusable("the LoRA output head is merged, disabled or not over an nn.Linear")
    weight = base.weight
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        dropout = head.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            raise HeadNotFusable(f"LoRA dropout {dropout.p} on the output head drops the adapter's input only, "
                                 "which no single weight expresses (--lora-dropout 0 lets it fuse)")
        if name in head.lora_variant or head.lora_bias.get(name):
            raise HeadNotFusable("the LoRA output head has a variant (DoRA) or its own bias")
        weight = weight + head.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def _in_autocast_dtype(*tensors):
    """The tensors cast to the autocast dtype when autocast is on for their device (as nn.Linear sees
    its input and weight under autocast); None stays None."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class TargetLogits(torch.nn.Module):
    """Student logits at selected positions only: decoder -> gather rows -> output head.

    The full [B, L, V] logits of a padded batch are never formed; the head runs on the N rows that have
    a teacher target, which saves (B * L - N) x V of compute and memory. Given `fused_loss`, not even
    the [N, V] logits are formed: the loss takes the head's input and weight (`sparse_kl_linear`).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                fused_loss=None):
        """
        Args:
            input_ids, attention_mask: int64 [B, L], right-padded.
            rows: int64 [N], indices into the flattened B * L positions.
            fused_loss: None, or a callable (hidden [N, H], weight [V, H], bias [V] or None, softcap) ->
                anything, given the head's inputs in the compute dtype; called inside this forward, so
                that DDP and FSDP see the head's weight used here (FSDP gathers it once per call).
        Returns:
            logits [N, V] in the head's compute dtype, or what `fused_loss` returns.
        """
        hidden = self._target_hidden(input_ids, attention_mask, rows)
        head = self.model.get_output_embeddings()
        if fused_loss is not None:
            weight, bias = head_weights(head)
            return fused_loss(*_in_autocast_dtype(hidden, weight, bias), self._softcap)
        logits = head(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _target_hidden(self, input_ids, attention_mask, rows) -> torch.Tensor:
        """The decoder's final hidden states [N, H] at the flattened `rows`."""
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return hidden.flatten(0, 1).index_select(0, rows)

    def check_matches_full_forward(self, input_ids: torch.Tensor) -> None:
        """Compares against the model's own forward on one short sequence, so that an architecture with
        extra output processing cannot train on wrong logits silently.

        Raises:
            TrainError: the two disagree.
        """
        mask, rows = torch.ones_like(input_ids), torch.arange(input_ids.numel(), device=input_ids.device)
        ours, reference = self._compare_without_dropout(lambda: self(input_ids, mask, rows), input_ids)
        if not _close(ours, reference):
            raise TrainError(
                f"{type(self.model).__name__}: decoder + output head does not reproduce the model's logits "
                f"(max diff {_max_diff(ours, reference):.3g}); this architecture post-processes "
                "its logits in a way the trainer does not know"
            )

    def fused_head_problem(self, input_ids: torch.Tensor) -> str | None:
        """Why the fused loss cannot stand in for this model's head, or None: the head is not a linear map
        `head_weights` knows, or decoder + `linear_head_logits` (the fused op's composition: weight, bias,
        the config's final_logit_softcapping) does not reproduce the model's own logits on `input_ids`."""
        try:
            head_weights(self.model.get_output_embeddings())
        except HeadNotFusable as exc:
            return str(exc)
        mask, rows = torch.ones_like(input_ids), torch.arange(input_ids.numel(), device=input_ids.device)

        def composed():
            return self(input_ids, mask, rows, fused_loss=lambda h, w, b, c: linear_head_logits(h, w, b, c))

        ours, reference = self._compare_without_dropout(composed, input_ids)
        if not _close(ours, reference):
            return (f"{type(self.model).__name__}'s logits are not its head's weight, bias and softcap applied to "
                    f"the decoder's output (max diff {_max_diff(ours, reference):.3g})")
        return None

    def _compare_without_dropout(self, ours, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ours(), the model's full-forward logits [L, V]) in eval mode (no LoRA dropout), under no_grad."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            mine = ours()
            reference = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.flatten(0, 1)
        self.train(was_training)
        return mine, reference


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
