"""Student initialisation: a shallower copy of the teacher (DistilBERT-style).

The student keeps the teacher's tokenizer, embeddings, final norm and output head, and N of its
decoder layers chosen by a layer map. Per-layer config lists (e.g. `layer_types`) are subset the same
way, so a student with all the teacher's layers is the teacher, logit for logit.
"""
from __future__ import annotations

import copy
import re

import torch

from kdengine.train.errors import TrainError


def layer_indices(layer_map: str, layers: int, teacher_layers: int) -> list[int]:
    """Which teacher layers the student's layers copy, in order.

    Args:
        layer_map: "first" (layers 0..N-1), "uniform" (spread evenly, first and last included), or a
            comma-separated list of N strictly increasing teacher layer indices, e.g. "0,4,8,11".
        layers: N, the student's depth.
        teacher_layers: the teacher's depth.
    Returns:
        N teacher layer indices.
    Raises:
        TrainError: N outside [1, teacher_layers], or a list that is malformed, out of range, not
            strictly increasing or not N long.
    """
    if not 1 <= layers <= teacher_layers:
        raise TrainError(f"--layers must be in [1, {teacher_layers}] (the teacher's depth), got {layers}")
    if layer_map == "first":
        return list(range(layers))
    if layer_map == "uniform":
        if layers == 1:
            return [0]
        return [round(i * (teacher_layers - 1) / (layers - 1)) for i in range(layers)]
    try:
        ids = [int(x) for x in layer_map.split(",")]
    except ValueError:
        raise TrainError(
            f"--layer-map must be 'first', 'uniform' or comma-separated layer indices like '0,5,9', got {layer_map!r}"
        ) from None
    if len(ids) != layers:
        raise TrainError(f"--layer-map lists {len(ids)} layers but --layers is {layers}")
    if any(not 0 <= i < teacher_layers for i in ids):
        raise TrainError(f"--layer-map indices must be in [0, {teacher_layers - 1}], got {ids}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise TrainError(f"--layer-map indices must be strictly increasing, got {ids}")
    return ids


def build_student(teacher: torch.nn.Module, layer_ids: list[int]) -> torch.nn.Module:
    """A new model of the teacher's class with `len(layer_ids)` decoder layers copied from the teacher.

    Args:
        teacher: a transformers causal LM (PreTrainedModel) whose decoder layers sit in one ModuleList
            of length `config.num_hidden_layers` (true of Llama, Mistral, Qwen, Gemma, GPT-2, ...).
        layer_ids: teacher layer indices, from `layer_indices`.
    Returns:
        The student, in the teacher's dtype, on the CPU, in eval mode. Its config records
        `kdengine_layer_map` (the teacher layers it was copied from).
    Raises:
        TrainError: the teacher's decoder layers cannot be found.
    """
    teacher_cfg = teacher.config
    depth = teacher_cfg.num_hidden_layers
    prefix = _layers_prefix(teacher, depth)
    cfg = copy.deepcopy(teacher_cfg)
    cfg.num_hidden_layers = len(layer_ids)
    for name, value in list(vars(cfg).items()):
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(cfg, name, type(value)(value[i] for i in layer_ids))
    if hasattr(cfg, "quantization_config"):  # a GGUF teacher is dequantized on load; the student is plain
        del cfg.quantization_config
    cfg.kdengine_layer_map = list(layer_ids)

    student = type(teacher)(cfg).to(dtype=teacher.dtype)
    student.load_state_dict(_select_layers(teacher.state_dict(), prefix, layer_ids), strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def _layers_prefix(model: torch.nn.Module, depth: int) -> str:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth and name:
            return name
    raise TrainError(
        f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of length "
        f"num_hidden_layers={depth}; make-student supports models whose layers sit in one ModuleList"
    )


def _select_layers(state: dict, prefix: str, layer_ids: list[int]) -> dict:
    """Teacher state dict -> student state dict: layer layer_ids[j] becomes layer j, others are dropped."""
    new_index = {old: new for new, old in enumerate(layer_ids)}
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.*)")
    out = {}
    for key, value in state.items():
        m = pattern.fullmatch(key)
        if m is None:
            out[key] = value
        elif int(m.group(1)) in new_index:
            out[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    return out


def make_student(teacher: str, *, layers: int, layer_map: str = "uniform", out: str) -> list[int]:
    """Builds a student from a teacher and saves it with the teacher's tokenizer (safetensors, HF layout).

    Args:
        teacher: a local HF model directory or a .gguf file, loaded the way the dump loads teachers
            (GGUF weights are dequantized to float32).
        layers, layer_map: see `layer_indices`.
        out: directory to write (created if missing).
    Returns:
        The teacher layer indices the student copied.
    Raises:
        TrainError: see `layer_indices` and `build_student`; TeacherError: the teacher cannot be loaded.
    """
    from kdengine.teachers.hf import load_hf_teacher

    loaded = load_hf_teacher(teacher, device="cpu", dtype="fp32")
    ids = layer_indices(layer_map, layers, loaded.model.config.num_hidden_layers)
    student = build_student(loaded.model, ids)
    student.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return ids
