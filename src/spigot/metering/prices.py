"""The price table: what a million tokens of each model cost, from a TOML file.

```toml
[prices."smollm2-135m-instruct"]
prompt = "0.10"        # USD per million uncached prompt tokens
cached = "0.05"        # per million prompt tokens served from the prefix cache
completion = "0.40"    # per million completion tokens

[prices."*"]           # fnmatch patterns; the first exact name, else the first pattern, wins
prompt = "0.20"
completion = "0.80"
```
Prices are strings (or integers) so that they are exact; a model with no
price costs nothing. A cached price above the prompt price is refused: admission
reserves a request's worst case before it knows how much of the prompt is cached,
and that bound holds only while a cached token costs no more than an uncached one.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spigot.metering.money import FREE, Price


class PriceError(ValueError):
    pass


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, Price] = field(default_factory=dict)

    def for_model(self, model: str) -> Price:
        if model in self.prices:
            return self.prices[model]
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return FREE

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PriceError(f"{path}: cannot read the price table: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PriceError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<prices>") -> PriceTable:
        if set(data) - {"prices"} or not isinstance(data.get("prices", {}), dict):
            raise PriceError(f'{source}: expected only [prices."MODEL"] tables')
        prices: dict[str, Price] = {}
        for model, entry in data.get("prices", {}).items():
            if not isinstance(entry, dict) or set(entry) - {"prompt", "cached", "completion"}:
                raise PriceError(
                    f"{source}: prices for {model!r} take prompt, cached and completion"
                )
            if "prompt" not in entry or "completion" not in entry:
                raise PriceError(f"{source}: prices for {model!r} need prompt and completion")
            if any(isinstance(v, float) for v in entry.values()):
                raise PriceError(
                    f'{source}: prices for {model!r} must be strings like "0.15" '
                    "(floats are not exact)"
                )
            try:
                prices[model] = Price.per_million(
                    prompt=entry["prompt"],
                    cached=entry.get("cached"),
                    completion=entry["completion"],
                )
            except (TypeError, ValueError) as exc:
                raise PriceError(f"{source}: prices for {model!r}: {exc}") from None
            price = prices[model]
            if price.cached > price.prompt:
                raise PriceError(
                    f"{source}: prices for {model!r}: the cached price ({entry['cached']}) is "
                    f"above the prompt price ({entry['prompt']}); cached prompt tokens must "
                    "cost at most what uncached ones do"
                )
        return cls(prices)
