"""Money as integer pico-USD (1e-12 USD): exact sums, no floats anywhere.

A price of USD 0.000001 per million tokens is one pico-USD per token, so every price quoted
with at most six decimals per million tokens is a whole number of pico-USD per token and every
cost is exact. A signed 64-bit column holds about USD 9.2 million: amounts above that are
refused when they are read (``parse_usd``), never left to overflow a database column.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

PICO_PER_USD = 10**12
PICO_PER_USD_PER_MILLION = 10**6  # USD per million tokens -> pico-USD per token
MAX_PRICE_DECIMALS = 6
MAX_USD_DECIMALS = 12
MAX_PUSD = 2**63 - 1  # a BIGINT column: budgets and spending in pico-USD
# USD 1 per token. Far above any real price, and low enough that a whole context of tokens
# at this price still fits a BIGINT (9.2 million tokens).
MAX_PRICE_PER_MILLION = 1_000_000

DecimalLike = str | int | Decimal


def _decimal(value: DecimalLike, what: str) -> Decimal:
    if isinstance(value, float | bool):
        # A float has already lost the exact price ("0.1" is not 0.1): make callers say it.
        raise TypeError(f"{what} must be a str, int or Decimal, not {type(value).__name__}")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValueError(f"{what} is not a number: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"{what} must be finite: {value!r}")
    if number < 0:
        raise ValueError(f"{what} must not be negative: {value!r}")
    return number


def _at_most(number: Decimal, limit: Decimal, what: str, value: object) -> None:
    # Checked before scaling to an int: "1e999999999" must not build a billion-digit number.
    if number > limit:
        raise ValueError(f"{what} must be at most {limit}: {value!r}")


def _exact_int(number: Decimal, scale: int, decimals: int, what: str, value: object) -> int:
    scaled = number.scaleb(scale)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{what} has more than {decimals} decimals: {value!r}")
    return int(scaled)


@dataclass(frozen=True, slots=True)
class Price:
    """Per-token prices in pico-USD: uncached prompt, cached prompt and completion tokens."""

    prompt: int
    cached: int
    completion: int

    def __post_init__(self) -> None:
        for name in ("prompt", "cached", "completion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} price must be a non-negative int, got {value!r}")

    @classmethod
    def per_million(
        cls,
        *,
        prompt: DecimalLike,
        completion: DecimalLike,
        cached: DecimalLike | None = None,
    ) -> Price:
        """Prices as quoted (USD per million tokens); cached prompt tokens cost the prompt price
        unless ``cached`` says otherwise."""

        def convert(value: DecimalLike, what: str) -> int:
            number = _decimal(value, what)
            _at_most(number, Decimal(MAX_PRICE_PER_MILLION), f"{what} (USD per million)", value)
            return _exact_int(number, MAX_PRICE_DECIMALS, MAX_PRICE_DECIMALS, what, value)

        prompt_pico = convert(prompt, "prompt price")
        return cls(
            prompt=prompt_pico,
            cached=prompt_pico if cached is None else convert(cached, "cached price"),
            completion=convert(completion, "completion price"),
        )

    def worst_case(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most a request can cost before its cached part is known: every prompt token at
        the higher of the prompt and cached prices (a table that prices cached tokens higher
        is refused at load; this keeps the bound even so), every completion token produced."""
        if min(prompt_tokens, completion_tokens) < 0:
            raise ValueError("token counts must not be negative")
        return prompt_tokens * max(self.prompt, self.cached) + completion_tokens * self.completion


FREE = Price(0, 0, 0)


def cost(price: Price, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
    """Pico-USD for one request; ``cached_tokens`` are the part of ``prompt_tokens`` served
    from the prefix cache."""
    if min(prompt_tokens, cached_tokens, completion_tokens) < 0:
        raise ValueError("token counts must not be negative")
    if cached_tokens > prompt_tokens:
        raise ValueError(f"cached_tokens ({cached_tokens}) > prompt_tokens ({prompt_tokens})")
    return (
        (prompt_tokens - cached_tokens) * price.prompt
        + cached_tokens * price.cached
        + completion_tokens * price.completion
    )


def usd(pico: int) -> Decimal:
    """Pico-USD as an exact Decimal number of dollars, for display (``f"{usd(x):.4f}"``)."""
    return Decimal(pico).scaleb(-MAX_USD_DECIMALS)


def parse_usd(text: DecimalLike) -> int:
    """``"12.50"`` (or ``"$12.50"``) -> pico-USD; more than 12 decimals is an error, not a
    rounding."""
    if isinstance(text, str):
        text = text.strip().removeprefix("$")
    number = _decimal(text, "amount")
    _at_most(number, usd(MAX_PUSD), "amount (USD)", text)
    return _exact_int(number, MAX_USD_DECIMALS, MAX_USD_DECIMALS, "amount", text)
