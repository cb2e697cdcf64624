"""Per-model prices and exact costs (sans-I/O).

Prices are per million tokens, per token class, written as decimal strings in the config
so no float ever touches money. A model's price is its exact entry, else the longest
matching ``prefix*`` entry, else the default. Classes a price leaves out fall back:
cache reads and writes to ``input``, one-hour cache writes to ``cache_write`` (then
``input``), reasoning to ``output``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .usage import Usage
from .validation import ConfigValueError, non_negative_decimal

MILLION = Decimal(1_000_000)
CLASSES = ("input", "cache_read", "cache_write", "cache_write_1h", "output", "reasoning",
           "unit")


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
    cache_write_1h: Decimal | None = None
    reasoning: Decimal | None = None
    unit: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        """Exact cost of ``usage``: every token class at its own price."""
        read = self.input if self.cache_read is None else self.cache_read
        write = self.input if self.cache_write is None else self.cache_write
        write_1h = write if self.cache_write_1h is None else self.cache_write_1h
        reasoning = self.output if self.reasoning is None else self.reasoning
        writes_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
        visible_output = max(0, usage.completion_tokens - usage.reasoning_tokens)
        total = (
            usage.uncached_prompt_tokens * self.input
            + usage.cache_read_tokens * read
            + (usage.cache_write_tokens - writes_1h) * write
            + writes_1h * write_1h
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

    @property
    def prices_anything(self) -> bool:
        return self.default is not None or bool(self.exact) or bool(self.prefixes)

    def covers(self, model: str) -> bool:
        """Whether ``model`` (a name, or a ``prefix*`` pattern: then every name it matches)
        has a price of its own, not just the default."""
        if model.endswith("*"):
            return any(model[:-1].startswith(p.pattern[:-1]) for p in self.prefixes)
        price = self.price_for(model)
        return price is not None and price is not self.default


EMPTY = PriceTable(version="", currency="USD", default=None, exact={}, prefixes=())


def unpriced_models(table: PriceTable, models: Iterable[str]) -> list[str]:
    """The models (names or ``prefix*`` patterns) that only the default price covers, or no
    price at all, in order, once each."""
    return [model for model in dict.fromkeys(models) if not table.covers(model)]


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
