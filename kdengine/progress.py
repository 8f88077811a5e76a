"""One progress bar for generation, shared by `eval gsm8k`, the demo and `generate`: it moves with
every decoding step and its rate is generated tokens/s.

    with TokenBar(len(prompts), max_new_tokens, desc="generating") as bar:
        for batch in batches:
            outs = teacher.generate(batch, max_new_tokens=max_new_tokens, on_step=bar.step)
            bar.batch_done(len(batch), sum(o.new_tokens for o in outs))

The bar's total starts as the token budget (prompts x max_new_tokens); each finished batch gives back
what its rows did not use (they stopped at EOS or a stop string), so at the end count == total ==
the tokens generated. The postfix counts finished prompts.
"""
from __future__ import annotations

from tqdm import tqdm


class TokenBar:
    """A tqdm bar over generated tokens (see the module docstring).

    Args:
        prompts: how many prompts will be generated for.
        max_new_tokens: the cap on each completion.
        desc: the bar's label.
        disable: no bar at all (the counts still work).
    """

    def __init__(self, prompts: int, max_new_tokens: int, *, desc: str = "generating", disable: bool = False):
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self.done = 0
        self.count, self.total = 0, prompts * max_new_tokens  # kept here too: a disabled tqdm counts nothing
        self._stepped_in_batch = 0
        self._bar = tqdm(total=prompts * max_new_tokens, unit="tok", unit_scale=False, desc=desc, disable=disable,
                         dynamic_ncols=True)
        self._bar.set_postfix_str(f"0/{prompts} prompts")

    def step(self, new_tokens: int) -> None:
        """One decoding step produced `new_tokens` tokens (one per row still running)."""
        self._stepped_in_batch += new_tokens
        self._advance(new_tokens)

    def batch_done(self, prompts: int, new_tokens: int) -> None:
        """A batch of `prompts` finished with `new_tokens` tokens in all; counts any tokens its steps did
        not report (a backend without per-step calls) and returns the unused budget."""
        if new_tokens > self._stepped_in_batch:
            self._advance(new_tokens - self._stepped_in_batch)
        self.total -= prompts * self.max_new_tokens - new_tokens
        self._bar.total = self.total
        self._stepped_in_batch = 0
        self.done += prompts
        self._bar.set_postfix_str(f"{self.done}/{self.prompts} prompts")
        self._bar.refresh()

    def _advance(self, tokens: int) -> None:
        self.count += tokens
        self._bar.update(tokens)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "TokenBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
