"""The trainer's fused head (--fused-head, sparse_kl_linear): the same losses and trained weights as the
logits path with untied, tied and LoRA heads; the loss validates only until the first step; the
fallbacks (targets without a fused loss, heads the op cannot express) train on logits with a note, or
are refused under an explicit --fused-head; a resume may switch it."""
import pytest
import torch
from conftest import assert_same_weights, build_model, read_records, train_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdengine.train import TrainError, main
from kdengine.train.model import HeadNotFusable, TargetLogits, head_weights, linear_head_logits
from kdengine.train.sources import SparseTargets

STEPS = ["--steps", 3, "--tail", "--approx-tempered-tail", "--temperature", 2, "--alpha", 0.7]


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory, student_dir):
    """A 1-layer student over the store's tokenizer whose output head is its embedding matrix."""
    return build_model(tmp_path_factory.mktemp("tied"), AutoTokenizer.from_pretrained(student_dir), layers=1,
                       seed=5, tied=True)


def _fused_and_logits_runs(student, store, tmp_path, *extra):
    main(train_args(student, store, tmp_path / "fused", *STEPS, *extra))
    main(train_args(student, store, tmp_path / "logits", *STEPS, *extra, "--no-fused-head"))
    return read_records(tmp_path / "fused"), read_records(tmp_path / "logits")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_head_takes_the_steps_of_the_logits(store_dir, student_dir, tied_student, tmp_path, tied):
    student = tied_student if tied else student_dir
    assert AutoModelForCausalLM.from_pretrained(student).config.tie_word_embeddings == tied
    fused, logits = _fused_and_logits_runs(student, store_dir, tmp_path)
    assert [r["fused_head"] for r in fused] == [True] * 3 and [r["fused_head"] for r in logits] == [False] * 3
    for key in ("loss", "kd", "ce", "grad_norm"):
        assert [r[key] for r in fused] == pytest.approx([r[key] for r in logits], rel=1e-5), key
    assert_same_weights(tmp_path / "fused" / "final", tmp_path / "logits" / "final", atol=1e-5)


def test_fused_lora_head_trains_its_adapter_like_the_logits(store_dir, student_dir, tmp_path):
    lora = ["--lora-rank", 4, "--lora-targets", "q_proj,lm_head", "--lora-dropout", 0, "--lr", 1e-2]
    fused, logits = _fused_and_logits_runs(student_dir, store_dir, tmp_path, *lora)
    assert all(r["fused_head"] for r in fused)
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in logits], rel=1e-5)
    assert_same_weights(tmp_path / "fused" / "final", tmp_path / "logits" / "final", atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(student_dir).lm_head.weight
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fused" / "final").lm_head.weight
    assert (merged - base).abs().max() > 1e-4  # the head's adapter learned: B @ A is no longer 0


def test_lora_head_weights_are_base_plus_scaled_adapter_with_gradients_to_both(student_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    head = peft_model.base_model.model.lm_head
    torch.nn.init.normal_(head.lora_B["default"].weight)
    x = torch.randn(5, model.config.hidden_size)
    weight, bias = head_weights(head)
    assert torch.allclose(linear_head_logits(x, weight, bias, None), head(x), atol=1e-4)
    weight.sum().backward()
    assert head.lora_A["default"].weight.grad.abs().sum() > 0 and head.lora_B["default"].weight.grad.abs().sum() > 0


def test_fused_head_problem_names_heads_the_op_cannot_express(student_dir):
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    probe = torch.arange(1, 9)[None]
    assert TargetLogits(model).fused_head_problem(probe) is None
    capped = TargetLogits(model)
    capped._softcap = 5.0  # the op's composition then caps logits the model's own forward leaves alone
    assert "not its head's weight, bias and softcap" in capped.fused_head_problem(probe)

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    head = model.lm_head
    model.lm_head = ScaledHead(head.in_features, head.out_features, bias=False)
    with pytest.raises(HeadNotFusable, match="a ScaledHead, not an nn.Linear"):
        head_weights(model.lm_head)
    assert "ScaledHead" in TargetLogits(model).fused_head_problem(probe)


def test_loss_validates_its_inputs_until_the_first_step(store_dir, student_dir, tmp_path, monkeypatch):
    seen = []
    loss_linear = SparseTargets.loss_linear

    def recording(self, *args, validate, **kwargs):
        seen.append(validate)
        return loss_linear(self, *args, validate=validate, **kwargs)

    monkeypatch.setattr(SparseTargets, "loss_linear", recording)
    main(train_args(student_dir, store_dir, tmp_path, "--steps", 3, "--grad-accum", 2))
    assert seen == [True, True, False, False, False, False]


def test_lora_dropout_on_the_head_falls_back_or_is_refused(store_dir, student_dir, tmp_path, capsys):
    lora = ["--steps", 2, "--lora-rank", 4, "--lora-targets", "q_proj,lm_head", "--lora-dropout", 0.1]
    main(train_args(student_dir, store_dir, tmp_path / "auto", *lora))
    assert "fused head off: LoRA dropout 0.1 on the output head" in capsys.readouterr().err
    assert [r["fused_head"] for r in read_records(tmp_path / "auto")] == [False, False]
    with pytest.raises(TrainError, match="^--fused-head: LoRA dropout 0.1 on the output head .*drop --fused-head"):
        main(train_args(student_dir, store_dir, tmp_path / "asked", *lora, "--fused-head"))


def test_targets_without_a_fused_loss_fall_back_or_are_refused(store_dir, student_dir, tmp_path, capsys):
    reference = ["--steps", 2, "--loss-impl", "reference"]
    main(train_args(student_dir, store_dir, tmp_path / "auto", *reference))
    assert "fused head off: SparseTargets has no fused-head loss" in capsys.readouterr().err
    records = read_records(tmp_path / "auto")
    assert [r["fused_head"] for r in records] == [False, False] and all(r["loss"] > 0 for r in records)
    with pytest.raises(TrainError, match="^--fused-head: SparseTargets has no fused-head loss"):
        main(train_args(student_dir, store_dir, tmp_path / "asked", *reference, "--fused-head"))


def test_a_resume_may_switch_the_fused_head(store_dir, student_dir, tmp_path, capsys):
    main(train_args(student_dir, store_dir, tmp_path / "straight", "--steps", 4))
    main(train_args(student_dir, store_dir, tmp_path / "split", "--steps", 4, "--stop-after", 2))
    capsys.readouterr()
    main(train_args(student_dir, store_dir, tmp_path / "split", "--steps", 4, "--resume", "--no-fused-head"))
    assert "config changed" not in capsys.readouterr().err
    assert [r["fused_head"] for r in read_records(tmp_path / "split")] == [True, True, False, False]
    assert_same_weights(tmp_path / "straight" / "final", tmp_path / "split" / "final", atol=1e-5)
