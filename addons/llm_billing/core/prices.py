"""Per-model prices and exact costs (sans-I/O).

Prices are per million tokens, per token class, written as decimal strings in the config
so no float ever touches money. A model's price is its exact entry, else the longest
matching ``prefix*`` entry, else the default. Classes a price leaves out fall back:
cache reads and writes to ``input``, reasoning to ``output``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .usage import Usage
from .validation import ConfigValueError, non_negative_decimal

MILLION = Decimal(1_000_000)
CLASSES = ("input", "cache_read", "cache_write", "output", "reasoning", "unit")


class PriceError(ConfigValueError):
    pass


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens of each class (``unit``: per million metered units)."""

    pattern: str
    input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    unit: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        """Exact cost of ``usage``: every token class at its own price."""
        read = self.input if self.cache_read is None else self.cache_read
        write = self.input if self.cache_write is None else self.cache_write
        reasoning = self.output if self.reasoning is None else self.reasoning
        visible_output = max(0, usage.completion_tokens - usage.reasoning_tokens)
        total = (
            usage.uncached_prompt_tokens * self.input
            + usage.cache_read_tokens * read
            + usage.cache_write_tokens * write
            + visible_output * self.output
            + usage.reasoning_tokens * reasoning
        )
        return total / MILLION

    def unit_cost(self, units: Decimal) -> Decimal | None:
        return None if self.unit is None else units * self.unit / MILLION

    def as_document(self) -> dict[str, str]:
        return {name: str(value) for name in CLASSES
                if (value := getattr(self, name)) is not None}


@dataclass(frozen=True, slots=True)
class PriceTable:
    version: str
    currency: str
    default: Price | None
    exact: Mapping[str, Price]
    prefixes: tuple[Price, ...]  # longest prefix first

    def price_for(self, model: str) -> Price | None:
        if (price := self.exact.get(model)) is not None:
            return price
        for price in self.prefixes:
            if model.startswith(price.pattern[:-1]):
                return price
        return self.default


EMPTY = PriceTable(version="", currency="USD", default=None, exact={}, prefixes=())


def parse_price(pattern: str, item: Any, where: str) -> Price:
    if not isinstance(item, dict):
        raise PriceError(f"{where}: must be a table like {{ input = \"1.00\", output = \"2.00\" }}")
    unknown = set(item) - set(CLASSES)
    if unknown:
        raise PriceError(f"{where}: unknown class {sorted(unknown)[0]!r}; "
                         f"classes are {', '.join(CLASSES)}")
    values = {name: non_negative_decimal(item[name], f"{where}.{name}")
              for name in CLASSES if name in item}
    return Price(pattern=pattern, **values)


def parse_prices(data: Any) -> PriceTable:
    """The ``[prices]`` table of config.toml."""
    if data is None:
        return EMPTY
    if not isinstance(data, dict):
        raise PriceError("prices: must be a table")
    version = data.get("version", "")
    if not isinstance(version, str):
        raise PriceError("prices.version: must be a string")
    currency = data.get("currency", "USD")
    default = parse_price("*", data["default"], "prices.default") if "default" in data else None
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise PriceError("prices.models: must be a table of model = { ... }")
    exact: dict[str, Price] = {}
    prefixes: list[Price] = []
    for pattern, item in models.items():
        price = parse_price(pattern, item, f"prices.models.{pattern!r}")
        if pattern.endswith("*"):
            prefixes.append(price)
        else:
            exact[pattern] = price
    prefixes.sort(key=lambda p: len(p.pattern), reverse=True)
    return PriceTable(version, str(currency), default, exact, tuple(prefixes))
