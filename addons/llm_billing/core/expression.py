"""Metering expressions (seed 000's language), parsed once and evaluated safely (sans-I/O).

    json(sseLastData(allData)).usage.total_tokens ?? 1

A small Pratt parser turns the source into a tree of closures; nothing is ever passed to
``eval``. Operators and precedence follow expr-lang, which the seed's gateway uses: ``??``
binds tighter than arithmetic, ``/`` always divides exactly. Member access and indexing
on nil or a missing key give nil rather than an error, so ``a.b.c ?? 1`` falls back when
any step is missing; ``??`` also falls back when its left side fails to evaluate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .sse import SSEParser

MAX_SOURCE = 4096
MAX_VALUE_SIZE = 64 << 20  # longest string or array an expression may build

VARIABLES = frozenset({
    "allData", "lastChunk", "respBody", "status", "responseBytes", "requestBytes", "path",
    "method", "userID", "planID", "keyID",
})

Env = Mapping[str, Any]
Node = Callable[[Env, dict], Any]  # (variables, per-evaluation memo) -> value


class ExpressionError(ValueError):
    """A syntax or name error, pointing at the spot."""

    def __init__(self, message: str, source: str, position: int) -> None:
        self.position = position
        pointer = " " * position + "^"
        super().__init__(f"{message} at column {position + 1}\n    {source}\n    {pointer}")


class EvaluationError(Exception):
    """The expression could not produce a value for this response."""


@dataclass(frozen=True, slots=True)
class Expression:
    source: str
    variables: frozenset[str]  # which variables it reads: the meter keeps only those
    _root: Node

    def evaluate(self, env: Env) -> Any:
        try:
            return self._root(env, {})
        except EvaluationError:
            raise
        except (TypeError, ValueError, ArithmeticError, RecursionError, MemoryError) as e:
            raise EvaluationError(f"{type(e).__name__}: {e}") from None


# --- Tokens ------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][+-]?\d+)?)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<op>\?\?|\?\.|\|\||&&|==|!=|<=|>=|[-+*/%<>!?:.,()\[\]{}])
""", re.VERBOSE)


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # number, string, name, op, end
    text: str
    position: int


def tokenize(source: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None:
            raise ExpressionError(f"unexpected character {source[position]!r}", source,
                                  position)
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(Token(kind, match.group(), position))
        position = match.end()
    tokens.append(Token("end", "", len(source)))
    return tokens


# --- Values ------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type(value: Any) -> str:
    if value is None:
        return "nil"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "array",
            dict: "map"}.get(type(value), type(value).__name__)


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    raise EvaluationError(f"expected a bool, got {_type(value)}")


def _member(value: Any, key: Any) -> Any:
    """``value.key`` / ``value[key]``; nil when anything is missing."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get(key) if isinstance(key, str) else None
    if isinstance(value, list | str):
        if not _is_number(key) or int(key) != key:
            return None
        index = int(key)
        if index < 0:
            index += len(value)
        return value[index] if 0 <= index < len(value) else None
    return None


def _checked(value: Any) -> Any:
    if isinstance(value, str | list) and len(value) > MAX_VALUE_SIZE:
        raise EvaluationError("value too large")
    return value


def _add(a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return a + b
    if isinstance(a, str) and isinstance(b, str):
        return _checked(a + b)
    if isinstance(a, list) and isinstance(b, list):
        return _checked(a + b)
    raise EvaluationError(f"cannot add {_type(a)} and {_type(b)}")


def _arith(symbol: str, op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def apply(a: Any, b: Any) -> Any:
        if not (_is_number(a) and _is_number(b)):
            raise EvaluationError(f"cannot apply {symbol} to {_type(a)} and {_type(b)}")
        if symbol in "/%" and b == 0:
            raise EvaluationError("division by zero")
        return op(a, b)

    return apply


def _compare(symbol: str, op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def apply(a: Any, b: Any) -> bool:
        if (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str)):
            return op(a, b)
        raise EvaluationError(f"cannot compare {_type(a)} {symbol} {_type(b)}")

    return apply


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def _in(a: Any, b: Any) -> bool:
    if isinstance(b, dict):
        return a in b
    if isinstance(b, list):
        return any(_equal(a, item) for item in b)
    if isinstance(b, str) and isinstance(a, str):
        return a in b
    raise EvaluationError(f"cannot test membership in {_type(b)}")


BINARY: dict[str, tuple[int, Callable[[Any, Any], Any]]] = {
    "+": (30, _add),
    "-": (30, _arith("-", lambda a, b: a - b)),
    "*": (60, _arith("*", lambda a, b: a * b)),
    "/": (60, _arith("/", lambda a, b: a / b)),
    "%": (60, _arith("%", lambda a, b: a % b)),
    "<": (20, _compare("<", lambda a, b: a < b)),
    "<=": (20, _compare("<=", lambda a, b: a <= b)),
    ">": (20, _compare(">", lambda a, b: a > b)),
    ">=": (20, _compare(">=", lambda a, b: a >= b)),
    "==": (20, _equal),
    "!=": (20, lambda a, b: not _equal(a, b)),
    "in": (20, _in),
}
LOGICAL = {"||": 10, "or": 10, "&&": 15, "and": 15}
COALESCE = 500
UNARY_NOT, UNARY_SIGN = 50, 90


# --- Functions ---------------------------------------------------------------------------

def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise EvaluationError(f"{name}() expects a string, got {_type(value)}")
    return value


def fn_json(value: Any) -> Any:
    if isinstance(value, dict | list) or value is None:
        return value
    try:
        return json.loads(_text(value, "json"))
    except (ValueError, RecursionError):
        return None


def fn_sse_events(value: Any) -> list[dict[str, Any]]:
    parser = SSEParser()
    data = _text(value, "sseEvents").encode()
    blocks = parser.feed(data) + parser.finish()
    return [{"event": b.event.event or "message", "data": b.event.data, "id": b.event.id}
            for b in blocks if b.event is not None]


def fn_sse_all_data(value: Any) -> list[str]:
    """Every event's data except OpenAI's closing ``[DONE]`` marker."""
    return [e["data"] for e in fn_sse_events(value) if e["data"] != "[DONE]"]


def fn_sse_last_data(value: Any) -> str | None:
    """The last event's data, skipping ``[DONE]`` (so it is the usage chunk on OpenAI)."""
    data = fn_sse_all_data(value)
    return data[-1] if data else None


def fn_lines(value: Any) -> list[str]:
    return _text(value, "lines").splitlines()


def fn_lines_non_empty(value: Any) -> list[str]:
    return [line for line in fn_lines(value) if line.strip()]


def fn_len(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str | list | dict):
        return len(value)
    raise EvaluationError(f"len() of {_type(value)}")


def _array(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise EvaluationError(f"{name}() expects an array, got {_type(value)}")
    return value


def fn_count(value: Any) -> int:
    return len(_array(value, "count"))


def fn_first(value: Any) -> Any:
    items = _array(value, "first")
    return items[0] if items else None


def fn_last(value: Any) -> Any:
    items = _array(value, "last")
    return items[-1] if items else None


def fn_get(value: Any, path: Any) -> Any:
    for part in _text(path, "get").split(".") if path else []:
        value = _member(value, int(part) if part.lstrip("-").isdigit() else part)
    return value


def _numbers(args: tuple[Any, ...], name: str) -> list[int | float]:
    """An array (optionally of maps, with a field path), or the arguments themselves."""
    if len(args) == 2 and isinstance(args[0], list) and isinstance(args[1], str):
        items = [fn_get(item, args[1]) for item in args[0]]
    elif len(args) == 1 and isinstance(args[0], list | type(None)):
        items = _array(args[0], name)
    else:
        items = list(args)
    numbers = [x for x in items if x is not None]
    if not all(_is_number(x) for x in numbers):
        raise EvaluationError(f"{name}() needs numbers")
    return numbers


def fn_sum(*args: Any) -> int | float:
    return sum(_numbers(args, "sum"))


def fn_avg(*args: Any) -> float | None:
    numbers = _numbers(args, "avg")
    return sum(numbers) / len(numbers) if numbers else None


def fn_min(*args: Any) -> Any:
    numbers = _numbers(args, "min")
    return min(numbers) if numbers else None


def fn_max(*args: Any) -> Any:
    numbers = _numbers(args, "max")
    return max(numbers) if numbers else None


def fn_coalesce(*args: Any) -> Any:
    return next((a for a in args if a is not None), None)


def fn_default(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


# name -> (function, min args, max args or None, pure: memoize per evaluation)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None, bool]] = {
    "json": (fn_json, 1, 1, True),
    "sseEvents": (fn_sse_events, 1, 1, True),
    "sseAllData": (fn_sse_all_data, 1, 1, True),
    "sseLastData": (fn_sse_last_data, 1, 1, True),
    "lines": (fn_lines, 1, 1, True),
    "linesNonEmpty": (fn_lines_non_empty, 1, 1, True),
    "len": (fn_len, 1, 1, False),
    "count": (fn_count, 1, 1, False),
    "first": (fn_first, 1, 1, False),
    "last": (fn_last, 1, 1, False),
    "sum": (fn_sum, 1, None, False),
    "avg": (fn_avg, 1, None, False),
    "min": (fn_min, 1, None, False),
    "max": (fn_max, 1, None, False),
    "get": (fn_get, 2, 2, False),
    "coalesce": (fn_coalesce, 1, None, False),
    "default": (fn_default, 2, 2, False),
}


# --- Parser ------------------------------------------------------------------------------

class _Parser:
    def __init__(self, source: str, allowed: frozenset[str]) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.index = 0
        self.allowed = allowed
        self.variables: set[str] = set()

    @property
    def token(self) -> Token:
        return self.tokens[self.index]

    def error(self, message: str, token: Token | None = None) -> ExpressionError:
        return ExpressionError(message, self.source, (token or self.token).position)

    def advance(self) -> Token:
        token = self.token
        self.index += 1
        return token

    def accept(self, text: str) -> bool:
        if self.token.kind in ("op", "name") and self.token.text == text:
            self.index += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            found = repr(self.token.text) if self.token.kind != "end" else "end of expression"
            raise self.error(f"expected {text!r}, found {found}")

    def parse(self) -> Node:
        if self.token.kind == "end":
            raise self.error("empty expression")
        node = self.expression()
        if self.token.kind != "end":
            raise self.error(f"unexpected {self.token.text!r}")
        return node

    def expression(self) -> Node:
        condition = self.binary(0)
        if not self.accept("?"):
            return condition
        then = self.expression()
        self.expect(":")
        otherwise = self.expression()
        return lambda env, memo: (then if _truthy(condition(env, memo)) else otherwise)(
            env, memo)

    def binary(self, min_power: int) -> Node:
        left = self.unary()
        while True:
            op = self.token.text if self.token.kind in ("op", "name") else ""
            if op == "??" and min_power < COALESCE:
                self.advance()
                left = _coalesce_node(left, self.binary(COALESCE))
            elif op in LOGICAL and LOGICAL[op] > min_power:
                self.advance()
                left = _logical_node(op, left, self.binary(LOGICAL[op]))
            elif op in BINARY and BINARY[op][0] > min_power:
                self.advance()
                power, apply = BINARY[op]
                left = _binary_node(apply, left, self.binary(power))
            else:
                return left

    def unary(self) -> Node:
        if self.accept("!") or self.accept("not"):
            operand = self.binary(UNARY_NOT)
            return lambda env, memo: not _truthy(operand(env, memo))
        if self.token.kind == "op" and self.token.text in "+-":
            sign = self.advance().text
            operand = self.binary(UNARY_SIGN)

            def signed(env: Env, memo: dict) -> Any:
                value = operand(env, memo)
                if not _is_number(value):
                    raise EvaluationError(f"cannot apply unary {sign} to {_type(value)}")
                return -value if sign == "-" else value

            return signed
        return self.postfix(self.primary())

    def postfix(self, node: Node) -> Node:
        while True:
            if self.accept(".") or self.accept("?."):
                name = self.advance()
                if name.kind != "name":
                    raise self.error("expected a field name after '.'", name)
                node = _member_node(node, _constant(name.text))
            elif self.accept("["):
                index = self.expression()
                self.expect("]")
                node = _member_node(node, index)
            else:
                return node

    def primary(self) -> Node:
        token = self.advance()
        if token.kind == "number":
            text = token.text.replace("_", "")
            is_float = any(c in text for c in ".eE")
            return _constant(float(text) if is_float else int(text))
        if token.kind == "string":
            try:
                return _constant(_unquote(token.text))
            except ValueError:
                raise self.error("bad escape in string", token) from None
        if token.kind == "name":
            keywords = {"nil": None, "null": None, "true": True, "false": False}
            if token.text in keywords:
                return _constant(keywords[token.text])
            if self.accept("("):
                return self.call(token)
            if token.text not in self.allowed:
                known = ", ".join(sorted(self.allowed))
                raise self.error(f"unknown variable {token.text!r} (known: {known})", token)
            self.variables.add(token.text)
            name = token.text
            return lambda env, memo: env.get(name)
        if token.kind == "op" and token.text == "(":
            node = self.expression()
            self.expect(")")
            return node
        if token.kind == "op" and token.text == "[":
            items = self.sequence("]")
            return lambda env, memo: [item(env, memo) for item in items]
        if token.kind == "op" and token.text == "{":
            return self.mapping()
        what = "end of expression" if token.kind == "end" else repr(token.text)
        raise self.error(f"unexpected {what}", token)

    def sequence(self, close: str) -> list[Node]:
        items: list[Node] = []
        while not self.accept(close):
            items.append(self.expression())
            if not self.accept(","):
                self.expect(close)
                break
        return items

    def mapping(self) -> Node:
        pairs: list[tuple[str, Node]] = []
        while not self.accept("}"):
            key = self.advance()
            if key.kind == "name":
                name = key.text
            elif key.kind == "string":
                name = _unquote(key.text)
            else:
                raise self.error("expected a key", key)
            self.expect(":")
            pairs.append((name, self.expression()))
            if not self.accept(","):
                self.expect("}")
                break
        return lambda env, memo: {k: v(env, memo) for k, v in pairs}

    def call(self, name: Token) -> Node:
        if name.text not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS))
            raise self.error(f"unknown function {name.text!r} (known: {known})", name)
        function, least, most, pure = FUNCTIONS[name.text]
        args = self.sequence(")")
        if len(args) < least or (most is not None and len(args) > most):
            expected = str(least) if least == most else f"{least}+" if most is None \
                else f"{least}-{most}"
            raise self.error(f"{name.text}() takes {expected} arguments, got {len(args)}",
                             name)
        label = name.text

        def invoke(env: Env, memo: dict) -> Any:
            values = [arg(env, memo) for arg in args]
            if not pure:
                return function(*values)
            # Pure parsers over the same objects run once per evaluation
            # (e.g. sseEvents(allData) written three times in one expression).
            key = (label, *map(id, values))
            if key not in memo:
                memo[key] = (function(*values), values)
            return memo[key][0]

        return invoke


def _unquote(text: str) -> str:
    if text[0] == "'":
        text = '"' + text[1:-1].replace('\\"', '"').replace('"', '\\"') + '"'
    value = json.loads(text)
    assert isinstance(value, str)
    return value


def _constant(value: Any) -> Node:
    return lambda env, memo: value


def _member_node(target: Node, key: Node) -> Node:
    return lambda env, memo: _member(target(env, memo), key(env, memo))


def _binary_node(apply: Callable[[Any, Any], Any], left: Node, right: Node) -> Node:
    return lambda env, memo: apply(left(env, memo), right(env, memo))


def _logical_node(op: str, left: Node, right: Node) -> Node:
    if op in ("||", "or"):
        return lambda env, memo: _truthy(left(env, memo)) or _truthy(right(env, memo))
    return lambda env, memo: _truthy(left(env, memo)) and _truthy(right(env, memo))


def _coalesce_node(left: Node, right: Node) -> Node:
    def coalesce(env: Env, memo: dict) -> Any:
        try:
            value = left(env, memo)
        except (EvaluationError, TypeError, ValueError, ArithmeticError):
            value = None
        return right(env, memo) if value is None else value

    return coalesce


def compile_expression(source: str, allowed: frozenset[str] = VARIABLES) -> Expression:
    """Parse ``source`` once; raises ExpressionError pointing at the bad spot."""
    if len(source) > MAX_SOURCE:
        raise ExpressionError(f"longer than {MAX_SOURCE} characters", source[:60], 0)
    parser = _Parser(source, allowed)
    try:
        root = parser.parse()
    except RecursionError:
        raise ExpressionError("nested too deeply", source, 0) from None
    return Expression(source, frozenset(parser.variables), root)


MAX_BILLABLE = 10**12


def billable(value: Any) -> int | float:
    """An expression's result as a billable quantity (numbers, or numeric strings)."""
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise EvaluationError(f"result {value!r} is not a number") from None
    if not _is_number(value) or not math.isfinite(value):
        raise EvaluationError(f"result is {_type(value)}, not a number")
    if value < 0:
        raise EvaluationError(f"result {value} is negative")
    if value > MAX_BILLABLE:  # would overflow the ledger's int64 counts; nobody uses this many
        raise EvaluationError(f"result {value} is out of range (at most {MAX_BILLABLE})")
    return value
