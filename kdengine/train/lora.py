"""LoRA students through `peft`: adapters injected into the student in place, so the loop, DDP/FSDP,
gradient checkpointing and the loss see the same module tree as in full fine-tuning, with only the
adapter weights trainable.

Checkpoints hold the adapter alone (peft layout, safetensors); `final/` is the merged model as a plain
HF directory and `final/adapter/` the adapter.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kdengine.train.errors import TrainError


def default_targets(model: torch.nn.Module, layers: torch.nn.ModuleList) -> list[str]:
    """The attention and MLP projections: names of the nn.Linear modules inside the decoder layers."""
    names = {name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def lora_config(cfg, model: torch.nn.Module, layers: torch.nn.ModuleList):
    from peft import LoraConfig

    targets = list(cfg.lora_targets) or default_targets(model, layers)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank
    return LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, cfg, layers: torch.nn.ModuleList):
    """Injects LoRA adapters into `model` in place (base weights frozen); returns the PeftModel around it.

    Raises:
        TrainError: a --lora-targets name that matches no module of the model.
    """
    from peft import get_peft_model

    config = lora_config(cfg, model, layers)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        linear = default_targets(model, layers)
        raise TrainError(f"--lora-targets {','.join(config.target_modules)}: {str(exc).splitlines()[0][:200]}; this "
                         f"model's decoder projections are {','.join(linear)}") from None
    return peft_model


def save_adapter(peft_model, directory: Path, hf_state: dict | None = None) -> None:
    """Writes the adapter (adapter_config.json + adapter_model.safetensors) to `directory`.

    Args:
        hf_state: a full state dict of the injected model (HF names) to take the adapter weights from;
            default: the model's own weights.
    """
    from peft import get_peft_model_state_dict

    state = None
    if hf_state is not None:
        state = get_peft_model_state_dict(peft_model, state_dict={"base_model.model." + k: v for k, v in hf_state.items()})
    peft_model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)


def load_adapter(peft_model, directory: Path) -> None:
    """Loads DIR/adapter_model.safetensors into the injected adapters (safetensors only, strict)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise TrainError(f"{path}: not a readable safetensors adapter ({str(exc).splitlines()[0][:200]}); delete the "
                         "checkpoint directory to resume from the one before it") from None
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise TrainError(f"{path}: adapter weights do not match this model and --lora-* options (missing "
                         f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")


def write_merged(student_dir: str, cfg, layers_of, hf_state: dict, directory: Path) -> None:
    """final/: a fresh copy of the base student with the trained adapter merged in, saved as a plain HF
    directory, and the adapter alone in DIR/adapter/.

    Args:
        layers_of: model -> its decoder ModuleList.
        hf_state: full state dict of the trained, injected model (HF names; tied aliases may be absent).
    """
    from kdengine.train.model import load_student

    base = load_student(student_dir, grad_checkpointing=False)
    peft_model = apply_lora(base, cfg, layers_of(base))
    missing, unexpected = base.load_state_dict(hf_state, strict=False)
    if unexpected or any("lora_" in k for k in missing):
        raise TrainError(f"cannot rebuild the LoRA model for final/ (missing {missing[:3]}, unexpected {unexpected[:3]})")
    save_adapter(peft_model, directory / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(directory))
