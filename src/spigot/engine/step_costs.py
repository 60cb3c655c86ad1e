"""What steps cost lately, so prompt chunks are sized by time rather than by a token count.

While streams decode, every prompt token added to a step delays all of their
next tokens. How much depends on the machine, the model, how many streams
decode and how deep the prompt already is (attention over a long context costs
several times what it costs near the start), so a fixed chunk is either too
timid on a fast machine or stalls streams on a slow one. The engine records
each step's decode tokens, prompt tokens and seconds here; ``prompt_budget``
turns "a mixed step may take at most ``slowdown`` times a decode-only step"
into a number of prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepCosts:
    smoothing: float = 0.25  # weight of the newest step in the moving averages
    decode_step_s: float | None = None  # a step with decode tokens only
    prompt_token_s: float | None = None  # one prompt token on top of that

    def record(self, decode_tokens: int, prompt_tokens: int, seconds: float) -> None:
        if decode_tokens == 0:
            # A prompt-only step says nothing about what prompt tokens add to
            # a decode step (its fixed cost would be charged to them).
            return
        if prompt_tokens == 0:
            self.decode_step_s = self._blend(self.decode_step_s, seconds)
        elif self.decode_step_s is not None:
            # Noise can make a mixed step look cheaper than a plain one; a
            # prompt token is never free.
            per_token = max(seconds - self.decode_step_s, 0.0) / prompt_tokens
            self.prompt_token_s = self._blend(self.prompt_token_s, max(per_token, 1e-6))

    def prompt_budget(self, slowdown: float, min_seconds: float, fallback: int) -> int:
        """Prompt tokens that fit next to the decode tokens of one step.

        The step may take ``slowdown`` times a decode-only step, and never less
        than ``min_seconds`` of prompt work, so a newcomer still gets its first
        token promptly while a single fast stream decodes. ``fallback`` until
        both costs have been seen.
        """
        if self.decode_step_s is None or self.prompt_token_s is None:
            return fallback
        seconds = max((slowdown - 1.0) * self.decode_step_s, min_seconds)
        return max(1, int(seconds / self.prompt_token_s + 1e-6))

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
