"""Training state on disk without pickle: a nested structure of dicts, lists, tuples, plain scalars and
tensors is split into NAME.safetensors (every tensor) and NAME.json (the structure, with each tensor
replaced by a reference to its safetensors key).

Loading parses JSON and safetensors only, so a checkpoint cannot run code however it was crafted.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kdengine.train.errors import TrainError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INT_KEYS = "__int_keys__"


def save_state(directory: Path, name: str, obj) -> list[Path]:
    """Writes `obj` as DIR/NAME.safetensors + DIR/NAME.json; returns the two paths (not yet fsynced)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    paths = [directory / f"{name}.safetensors", directory / f"{name}.json"]
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(paths[0]))
    paths[1].write_text(json.dumps(tree) + "\n")
    return paths


def load_state(directory: Path, name: str):
    """Reads what `save_state` wrote.

    Raises:
        TrainError: a missing, unreadable or inconsistent file (the message names it).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_path, tree_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    try:
        tree = json.loads(tree_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrainError(f"{tree_path}: cannot read this training-state file ({_short(exc)}); delete the "
                         "checkpoint directory to resume from the one before it") from None
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise TrainError(f"{tensor_path}: not a readable safetensors file ({_short(exc)}); delete the "
                         "checkpoint directory to resume from the one before it") from None
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainError(f"{tree_path}: does not match {tensor_path.name} ({_short(exc)}); delete the checkpoint "
                         "directory to resume from the one before it") from None


def _encode(obj, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INT_KEYS: [[k, _encode(v, tensors)] for k, v in obj.items()]}
        raise TypeError(f"cannot store a dict with keys {list(obj)[:3]}")
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training-state file")


def _decode(tree, tensors: dict):
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        if _TUPLE in tree:
            return tuple(_decode(v, tensors) for v in tree[_TUPLE])
        if _INT_KEYS in tree:
            return {int(k): _decode(v, tensors) for k, v in tree[_INT_KEYS]}
        return {k: _decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    return tree


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
