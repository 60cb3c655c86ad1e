"""What steps cost lately, so prompt chunks are sized by time rather than by a token count.

While streams decode, every prompt token added to a step delays all of their
next tokens. How much depends on the machine, the model, how many streams
decode and how deep the prompt already is (attention over a long context costs
several times what it costs near the start), so a fixed chunk is either too
timid on a fast machine or stalls streams on a slow one. The engine records
each step's decode tokens, prompt tokens and seconds here; ``prompt_budget``
turns "a mixed step may take at most ``slowdown`` times a decode-only step"
into a number of prompt tokens. When more sequences wait for their first
token than decode, the balance tips towards them in proportion: the delay is
paid by the decoding streams and buys progress for the waiting prompts
(several newcomers would otherwise crawl behind one another). The scheduler
applies the budget only against streams that were streaming before the
oldest waiting prompt arrived, so a burst's own prompts are not paced.

Under steady load every step may carry prompt tokens, so decode-only steps
could stop happening and the estimate go stale (or never exist): when none was
seen for ``remeasure_after`` steps, the budget is 0 for one step, which is
then a decode-only step to time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepCosts:
    smoothing: float = 0.25  # weight of the newest step in the moving averages
    # Seconds of a step with decode tokens only, by how many it carried: one
    # stream's step and 32 streams' differ several times over.
    decode_steps: dict[int, float] = field(default_factory=dict)
    prompt_token_s: float | None = None  # one prompt token on top of a decode step
    remeasure_after: int = 100  # steps with prompt tokens before a decode-only one is due
    steps_since_plain: int = 0

    def record(self, decode_tokens: int, prompt_tokens: int, seconds: float) -> None:
        if decode_tokens == 0:
            # A prompt-only step says nothing about what prompt tokens add to
            # a decode step (its fixed cost would be charged to them).
            return
        if prompt_tokens == 0:
            old = self.decode_steps.get(decode_tokens)
            self.decode_steps[decode_tokens] = self._blend(old, seconds)
            self.steps_since_plain = 0
            return
        self.steps_since_plain += 1
        plain = self.decode_step_s(decode_tokens)
        if plain is not None:
            # Noise can make a mixed step look cheaper than a plain one; a
            # prompt token is never free.
            per_token = max(seconds - plain, 0.0) / prompt_tokens
            self.prompt_token_s = self._blend(self.prompt_token_s, max(per_token, 1e-6))

    def decode_step_s(self, decode_tokens: int) -> float | None:
        """A decode-only step of ``decode_tokens``: as seen, else from a line.

        Counts not seen yet are read off the least-squares line ``a + b * n``
        through the counts seen (a step's fixed cost plus a cost per stream),
        or, with one count seen, scaled in proportion to it.
        """
        if not self.decode_steps:
            return None
        seen = self.decode_steps.get(decode_tokens)
        if seen is not None:
            return seen
        if len(self.decode_steps) == 1:
            ((count, seconds),) = self.decode_steps.items()
            return seconds * decode_tokens / count
        points = self.decode_steps.items()
        mean_n = sum(n for n, _ in points) / len(points)
        mean_t = sum(t for _, t in points) / len(points)
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        per_stream = sum((n - mean_n) * (t - mean_t) for n, t in points) / spread
        per_stream = max(per_stream, 0.0)  # noise can tilt the line the wrong way
        return max(mean_t + per_stream * (decode_tokens - mean_n), 1e-6)

    def prompt_budget(
        self,
        slowdown: float,
        min_seconds: float,
        fallback: int,
        decoding: int = 1,
        prefilling: int = 1,
    ) -> int:
        """Prompt tokens that fit next to ``decoding`` decode tokens in one step.

        The step may take ``slowdown`` times a decode-only step (scaled up by
        ``prefilling / decoding`` sequences when that is above 1), and never
        less than ``min_seconds`` of prompt work, so a newcomer still gets its
        first token promptly while a single fast stream decodes. 0 when a
        decode-only step is due to be timed; ``fallback`` until the first
        prompt tokens have been.
        """
        if not self.decode_steps or self.steps_since_plain >= self.remeasure_after:
            return 0
        plain = self.decode_step_s(decoding)
        if plain is None or self.prompt_token_s is None:
            return fallback
        balance = max(1.0, prefilling / max(decoding, 1))
        seconds = max((slowdown - 1.0) * plain * balance, min_seconds)
        return max(1, int(seconds / self.prompt_token_s + 1e-6))

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
