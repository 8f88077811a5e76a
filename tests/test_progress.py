"""The generation progress bar moves every decoding step and ends at the exact token count."""
from kdengine.evals.generation import build_prompts, generate_all
from kdengine.progress import TokenBar


def test_on_step_calls_add_up_to_each_completions_new_tokens(tiny_model_dir):
    from kdengine.teachers import load_teacher

    teacher = load_teacher(tiny_model_dir)
    prompts = build_prompts(["a b", "the apples cost 12 dollars each day", "how many?"])
    steps: list[int] = []
    outs = teacher.generate(prompts, max_new_tokens=7, stop=["Question:"], on_step=steps.append)
    assert sum(steps) == sum(o.new_tokens for o in outs)
    assert len(steps) == max(o.new_tokens for o in outs)  # one call per decoding step
    assert steps[0] == len(prompts) and steps == sorted(steps, reverse=True)


def test_token_bar_counts_generated_tokens_and_gives_back_the_unused_budget():
    with TokenBar(prompts=5, max_new_tokens=10, disable=True) as bar:
        assert (bar.count, bar.total) == (0, 50)
        for n in (3, 3, 2):
            bar.step(n)
        bar.batch_done(3, 8)
        assert (bar.count, bar.total, bar.done) == (8, 8 + 2 * 10, 3)
        bar.batch_done(2, 13)  # a backend that never called step: counted at the batch's end
        assert (bar.count, bar.total, bar.done) == (21, 21, 5)


def test_generate_all_reports_per_step_progress(tiny_model_dir, capsys):
    from kdengine.teachers import load_teacher

    teacher = load_teacher(tiny_model_dir)
    run = generate_all(teacher, build_prompts(["a b", "how many?"]), batch_size=2, max_new_tokens=6)
    err = capsys.readouterr().err
    assert f"{sum(run.new_tokens)}/{sum(run.new_tokens)}" in err and "tok/s" in err and "2/2 prompts" in err
