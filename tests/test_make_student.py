"""Student initialisation on the tiny real Llama: copied weights, exact logits at full depth, tied
embeddings, layer maps and their errors."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from click.testing import CliRunner

from kdengine.cli import cli
from kdengine.teachers import tokenizer_fingerprint
from kdengine.train.errors import TrainError
from kdengine.train.student import build_student, layer_indices, make_student


@pytest.fixture(scope="module")
def deep_teacher_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 4-layer variant of the tiny Llama, so layer maps have something to choose from."""
    from conftest import build_model

    out = tmp_path_factory.mktemp("deep_teacher")
    return build_model(out, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), layers=4, seed=1)


def _ids(tokenizer):
    return torch.tensor([tokenizer("Apples cost 12 dollars each. How many do we buy?")["input_ids"]])


def test_layer_maps():
    assert layer_indices("first", 3, 12) == [0, 1, 2]
    assert layer_indices("uniform", 4, 10) == [0, 3, 6, 9]
    assert layer_indices("uniform", 1, 10) == [0]
    assert layer_indices("2,5,9", 3, 10) == [2, 5, 9]


@pytest.mark.parametrize(
    "layer_map, layers, message",
    [
        ("first", 0, r"--layers must be in \[1, 10\]"),
        ("first", 11, r"--layers must be in \[1, 10\] \(the teacher's depth\), got 11"),
        ("0,1", 3, "lists 2 layers but --layers is 3"),
        ("0,10", 2, r"indices must be in \[0, 9\], got \[0, 10\]"),
        ("3,1", 2, "strictly increasing, got"),
        ("every-other", 2, "'first', 'uniform' or comma-separated"),
    ],
)
def test_layer_map_errors(layer_map, layers, message):
    with pytest.raises(TrainError, match=message):
        layer_indices(layer_map, layers, 10)


def test_student_copies_the_chosen_layers(deep_teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(deep_teacher_dir)
    result = CliRunner().invoke(cli, ["make-student", "--teacher", str(deep_teacher_dir), "--layers", "2",
                                      "--layer-map", "1,3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "teacher layers 1,3" in result.output

    student = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert student.config.num_hidden_layers == 2
    assert student.config.kdengine_layer_map == [1, 3]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([1, 3]):
        for name, value in teacher.model.layers[i].state_dict().items():
            assert torch.equal(s_state[f"model.layers.{j}.{name}"], value), name
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[key], t_state[key]), key
    assert student.model.layers[1].self_attn.layer_idx == 1  # rebuilt, not a deep copy of teacher layer 3
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_fingerprint(tokenizer)
    assert any(p.name.endswith(".safetensors") for p in tmp_path.iterdir())


def test_full_depth_student_is_the_teacher(deep_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher_dir).eval()
    student = build_student(teacher, [0, 1, 2, 3])
    x = _ids(AutoTokenizer.from_pretrained(deep_teacher_dir))
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


def test_tied_embeddings_stay_tied(deep_teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher_dir)
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    teacher.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(deep_teacher_dir).save_pretrained(tmp_path / "tied")
    assert make_student(str(tmp_path / "tied"), layers=1, layer_map="uniform", out=str(tmp_path / "s")) == [0]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.model.embed_tokens.weight)


def test_cli_errors_are_one_line(deep_teacher_dir, tmp_path):
    result = CliRunner().invoke(cli, ["make-student", "--teacher", str(deep_teacher_dir), "--layers", "9",
                                      "--out", str(tmp_path)])
    assert result.exit_code != 0 and result.exception.__class__ is SystemExit
    assert r"--layers must be in [1, 4] (the teacher's depth), got 9" in result.output
    result = CliRunner().invoke(cli, ["make-student", "--teacher", str(tmp_path / "nope"), "--layers", "1",
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "nope" in result.output and "Traceback" not in result.output
