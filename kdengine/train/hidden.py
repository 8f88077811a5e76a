"""Feature distillation: the student's decoder-layer outputs matched to the teacher's.

A pair "s:t" matches the output of student decoder layer s (0-based) with the output of teacher decoder
layer t, at the rows that carry a KD target. When the widths differ, a learned linear map per pair takes
the student's hidden state to the teacher's width; the maps are training state (checkpointed in
`projections.safetensors`, resumed exactly), not part of the exported student. Per row and pair:

    mse     mean_d (W h_s - h_t)_d^2
    cosine  1 - cos(W h_s, h_t)

averaged over the pairs; the trainer sums it over rows like the KD loss and adds `--hidden-weight` times it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdengine.train.errors import TrainError
from kdengine.train.model import TargetLogits, decoder_layers
from kdengine.train.student import layer_indices

HIDDEN_LOSSES = ("mse", "cosine")
PROJECTIONS_FILE = "projections.safetensors"


def layer_pairs(spec: str | None, *, student_layers: int, teacher_layers: int,
                recorded_map: list[int] | None) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs of `--hidden-layers`.

    Args:
        spec: "s1:t1,s2:t2,..." or None/"" for the default: the layer map `make-student` recorded in the
            student's config (student layer j <-> the teacher layer it was copied from), else a uniform
            spread (first and last layers matched).
        student_layers, teacher_layers: the two depths.
        recorded_map: the student config's `kdengine_layer_map`, or None.
    Raises:
        TrainError: a malformed spec, a layer index out of range, or a repeated student layer.
    """
    if not spec:
        if recorded_map is not None and len(recorded_map) == student_layers \
                and all(0 <= t < teacher_layers for t in recorded_map):
            return list(enumerate(recorded_map))
        if student_layers > teacher_layers:
            raise TrainError(f"--hidden-layers: the student has {student_layers} decoder layers, more than the "
                             f"teacher's {teacher_layers}, so there is no default map; list the pairs, e.g. '0:0,3:1'")
        return list(enumerate(layer_indices("uniform", student_layers, teacher_layers)))
    pairs = []
    for item in spec.split(","):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise TrainError(f"--hidden-layers {spec!r}: {item.strip()!r} is not 'STUDENT:TEACHER' (two layer "
                             "indices, e.g. '0:0,7:15,14:29')") from None
        if not 0 <= s < student_layers:
            raise TrainError(f"--hidden-layers {spec!r}: student layer {s} is out of range: the student has "
                             f"{student_layers} decoder layers (0..{student_layers - 1})")
        if not 0 <= t < teacher_layers:
            raise TrainError(f"--hidden-layers {spec!r}: teacher layer {t} is out of range: the teacher has "
                             f"{teacher_layers} decoder layers (0..{teacher_layers - 1})")
        pairs.append((s, t))
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise TrainError(f"--hidden-layers {spec!r}: a student layer appears twice; match each once")
    return pairs


class LayerOutputs:
    """Forward hooks that keep the outputs of some decoder layers from the latest forward."""

    def __init__(self, layers: nn.ModuleList, indices: list[int]):
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles = [layers[i].register_forward_hook(self._keeper(i)) for i in sorted(set(indices))]

    def _keeper(self, index: int):
        def hook(_module, _inputs, output):
            self._outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def take(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s output [B, L, D] of the latest forward at flattened `rows`: [N, D]."""
        out = self._outputs[index]
        return out.flatten(0, 1).index_select(0, rows)

    def clear(self) -> None:
        self._outputs.clear()


class Projections(nn.Module):
    """One map per pair from the student's width to the teacher's: nn.Linear (no bias), or the identity
    when the widths are equal. A fresh map is a seeded random init scaled like nn.Linear's default."""

    def __init__(self, pairs: int, student_width: int, teacher_width: int):
        super().__init__()
        self.maps = nn.ModuleList(
            nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)
            for _ in range(pairs)
        )

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.maps[index](hidden)


class StudentWithHidden(TargetLogits):
    """TargetLogits that also returns the student's hidden states at the pairs' layers, projected to the
    teacher's width: forward(...) -> (logits [N, V] or what `fused_loss` returns, [hidden [N, D_teacher]
    per pair])."""

    def __init__(self, model: nn.Module, pairs: list[tuple[int, int]], teacher_width: int):
        super().__init__(model)
        self._student_layers = [s for s, _ in pairs]
        self.projections = Projections(len(pairs), model.config.hidden_size, teacher_width)
        self._outputs = LayerOutputs(decoder_layers(model), self._student_layers)

    def forward(self, input_ids, attention_mask, rows, fused_loss=None):
        out = super().forward(input_ids, attention_mask, rows, fused_loss)
        hidden = [self.projections(j, self._outputs.take(s, rows)) for j, s in enumerate(self._student_layers)]
        self._outputs.clear()
        return out, hidden

    def check_matches_full_forward(self, input_ids: torch.Tensor) -> None:
        TargetLogits(self.model).check_matches_full_forward(input_ids)
        self._outputs.clear()

    def fused_head_problem(self, input_ids: torch.Tensor) -> str | None:
        problem = TargetLogits(self.model).fused_head_problem(input_ids)
        self._outputs.clear()
        return problem


def hidden_loss_rows(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The feature loss per row [N] (float32), averaged over pairs (module docstring)."""
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"hidden loss must be one of {', '.join(HIDDEN_LOSSES)}, got {kind!r}")
    total = None
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.to(s.device).float()
        if kind == "mse":
            rows = (s - t).pow(2).mean(-1)
        else:
            rows = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
        total = rows if total is None else total + rows
    return total / len(student)


def projection_state(model_state: dict) -> dict:
    """The projection weights among a training module's full state dict (keys 'projections.*')."""
    return {k: v.contiguous() for k, v in model_state.items() if k.startswith("projections.")}


def save_projections(directory: Path, state: dict) -> None:
    if state:
        from safetensors.torch import save_file

        save_file(state, str(Path(directory) / PROJECTIONS_FILE))


def load_projections(module: StudentWithHidden, checkpoint: Path) -> None:
    """Restores the projections saved with a checkpoint (no file: the maps are identities, nothing to load).

    Raises:
        TrainError: the checkpoint's maps are missing or do not fit this run's pairs and widths.
    """
    from safetensors.torch import load_file

    expected = module.projections.state_dict()
    path = Path(checkpoint) / PROJECTIONS_FILE
    if not expected:
        return
    if not path.is_file():
        raise TrainError(f"{checkpoint} has no {PROJECTIONS_FILE}, but this run learns hidden-state projections; "
                         "resume with the --hidden-* options the run was started with, or start a new --out")
    saved = {k.removeprefix("projections."): v for k, v in load_file(str(path)).items()}
    if saved.keys() != expected.keys() or any(saved[k].shape != expected[k].shape for k in saved):
        raise TrainError(f"{path}: its projections do not fit this run's --hidden-layers and model widths; resume "
                         "with the --hidden-* options the run was started with, or start a new --out")
    module.projections.load_state_dict(saved)
