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


class TargetLogits(torch.nn.Module):
    """Student logits at selected positions only: decoder -> gather rows -> output head.

    The full [B, L, V] logits of a padded batch are never formed; the head runs on the N rows that have
    a teacher target, which saves (B * L - N) x V of compute and memory.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids, attention_mask: int64 [B, L], right-padded.
            rows: int64 [N], indices into the flattened B * L positions.
        Returns:
            logits [N, V] in the head's compute dtype.
        """
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        logits = self.model.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, rows))
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def check_matches_full_forward(self, input_ids: torch.Tensor) -> None:
        """Compares against the model's own forward on one short sequence, so that an architecture with
        extra output processing cannot train on wrong logits silently.

        Raises:
            TrainError: the two disagree.
        """
        mask = torch.ones_like(input_ids)
        rows = torch.arange(input_ids.numel(), device=input_ids.device)
        was_training = self.training
        self.eval()  # no dropout (LoRA's) in the comparison
        with torch.no_grad():
            ours = self(input_ids, mask, rows)
            reference = self.model(input_ids=input_ids, attention_mask=mask).logits.flatten(0, 1)
        self.train(was_training)
        if not torch.allclose(ours.float(), reference.float(), atol=1e-4, rtol=1e-4):
            raise TrainError(
                f"{type(self.model).__name__}: decoder + output head does not reproduce the model's logits "
                f"(max diff {(ours.float() - reference.float()).abs().max():.3g}); this architecture post-processes "
                "its logits in a way the trainer does not know"
            )
