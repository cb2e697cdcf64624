"""The metering expression language: seed 000's expressions, every operator and function,
errors that point at the spot, and no input that can escape or crash it."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_upstream import (
    anthropic_stream,
    anthropic_usage,
    gemini_sse,
    gemini_usage,
    openai_chat_stream,
    openai_chat_usage,
)
from llm_billing.core.expression import (
    EvaluationError,
    ExpressionError,
    billable,
    compile_expression,
)

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 5}
OPENAI = b"".join(openai_chat_stream(BODY, "t")).decode()
ANTHROPIC = b"".join(anthropic_stream(BODY, "t")).decode()
GEMINI_BODY = {"contents": [{"parts": [{"text": "hi"}]}], "max_tokens": 5}
GEMINI = b"".join(gemini_sse(GEMINI_BODY, "gemini-2.5-flash")).decode()


def run(source: str, **env):
    return compile_expression(source).evaluate(env)


def test_seed_000_expressions():
    assert run("json(sseLastData(allData)).usage.total_tokens ?? 1", allData=OPENAI) == \
        openai_chat_usage(BODY)["total_tokens"]
    usage = anthropic_usage(BODY)
    assert run("(json(sseEvents(allData)[0].data).message.usage.input_tokens ?? 0) + (json(sseEvents(allData)[count(sseEvents(allData))-2].data).usage.output_tokens ?? 0)",
               allData=ANTHROPIC) == usage["input_tokens"] + usage["output_tokens"]
    assert run("json(sseLastData(allData)).usageMetadata.totalTokenCount ?? 1",
               allData=GEMINI) == gemini_usage(GEMINI_BODY)["totalTokenCount"]
    assert run("responseBytes / 1024", responseBytes=3072) == 3.0
    assert run("count(linesNonEmpty(allData))", allData="a\n\n b\r\n\n") == 2
    assert run("status < 400 ? respBody.units : 0", status=200, respBody={"units": 5}) == 5
    assert run("status < 400 ? respBody.units : 0", status=503) == 0
    assert billable(run('"1"')) == 1


def test_fallbacks_for_missing_things():
    assert run("json(sseLastData(allData)).usage.total_tokens ?? 1", allData="") == 1
    assert run("json(sseLastData(allData)).usage.total_tokens ?? 1", allData="garbage") == 1
    assert run("respBody.a.b[3].c ?? 7", respBody={"a": {"b": [1]}}) == 7
    with pytest.raises(EvaluationError):  # ?? binds tighter than +, as in expr-lang
        run("respBody.a + 1 ?? 9", respBody={})
    assert run("(respBody.a + 1) ?? 9", respBody={}) == 9  # an error on the left falls back


@pytest.mark.parametrize(("source", "value"), [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 % 4", 3), ("7 / 2", 3.5), ("-2 * -3", 6),
    ("1 < 2 && 2 <= 2 || false", True), ("!(1 == 1)", False), ("not true or true", True),
    ("nil ?? 0", 0), ("false ?? 1", False), ("'a' + \"b\"", "ab"), ("[1, 2] + [3]", [1, 2, 3]),
    ("{a: 1, 'b': [2]}.b[0]", 2), ("[1, 2, 3][-1]", 3), ("len('abc') + len([1]) + len({})", 4),
    ("first([4, 5]) + last([4, 5])", 9), ("sum([1, 2, 3])", 6),
    ("sum([{n: 1}, {n: 2}], 'n')", 3), ("avg([2, 4])", 3.0), ("min(3, 1, 2)", 1),
    ("max([3, 1, 2])", 3), ("get({a: {b: [0, {c: 8}]}}, 'a.b.1.c')", 8),
    ("coalesce(nil, nil, 3)", 3), ("default(nil, 4)", 4), ("default(0, 4)", 0),
    ("2 in [1, 2]", True), ("'x' in {x: 1}", True), ("1 == 1.0", True), ("true == 1", False),
    ("1_000 + 1e3", 2000.0), ("sseAllData('data: a\\n\\ndata: [DONE]\\n\\n')", ["a"]),
    ("sseEvents('event: e\\ndata: x\\nid: 1\\n\\n')", [{"event": "e", "data": "x",
                                                        "id": "1"}]),
    ("lines('a\\nb')", ["a", "b"]), ("1 > 2 ? 'x' : 2 > 1 ? 'y' : 'z'", "y"),
])
def test_operators_and_functions(source: str, value):
    assert run(source) == value


@pytest.mark.parametrize(("source", "column", "message"), [
    ("json(allData", 13, "expected ')'"),
    ("allData +", 10, "unexpected end"),
    ("nope + 1", 1, "unknown variable 'nope'"),
    ("open('x')", 1, "unknown function 'open'"),
    ("__import__('os')", 1, "unknown function"),
    ("len(1, 2)", 1, "takes 1 arguments"),
    ("1 ? 2", 6, "expected ':'"),
    ("a.b", 1, "unknown variable 'a'"),
    ("respBody. 1", 11, "field name"),
    ("1 # 2", 3, "unexpected character '#'"),
    ("", 1, "empty expression"),
])
def test_errors_point_at_the_spot(source: str, column: int, message: str):
    with pytest.raises(ExpressionError) as err:
        compile_expression(source)
    assert message in str(err.value)
    assert err.value.position == column - 1


@pytest.mark.parametrize("source", [
    "1 / 0", "'a' - 1", "nil + 1", "1 < 'a'", "!5", "-'a'", "sum(['a'])", "len(5)",
])
def test_evaluation_errors(source: str):
    with pytest.raises(EvaluationError):
        run(source)


def test_billable_values():
    assert billable(3) == 3 and billable(2.5) == 2.5 and billable("12") == 12
    for bad in (None, True, "x", -1, float("nan"), [1], 10**30, "1e300"):
        with pytest.raises(EvaluationError):
            billable(bad)


def test_only_referenced_variables_are_reported():
    assert compile_expression("responseBytes / 1024").variables == {"responseBytes"}
    assert compile_expression("json(sseLastData(allData)).a ?? status").variables == \
        {"allData", "status"}


def test_repeated_parses_run_once_per_evaluation(monkeypatch):
    from llm_billing.core import expression
    calls = []
    original = expression.fn_sse_events
    monkeypatch.setitem(expression.FUNCTIONS, "sseEvents",
                        (lambda v: calls.append(1) or original(v), 1, 1, True))
    source = "count(sseEvents(allData)) + count(sseEvents(allData))"
    assert compile_expression(source).evaluate({"allData": ANTHROPIC}) > 0
    assert len(calls) == 1


@settings(max_examples=500)
@given(st.lists(st.sampled_from([*"()[]{}.,:?!<>=+-*/%&|'\"abcnil019 _", "allData",
                                 "json(", "sseEvents(", "??", "&&", "nil", "true",
                                 "respBody", "len("]), max_size=30).map("".join))
def test_any_source_compiles_or_fails_cleanly(source: str):
    try:
        expr = compile_expression(source)
    except ExpressionError:
        return
    with contextlib.suppress(EvaluationError):
        expr.evaluate({"allData": OPENAI, "respBody": {"a": [1, {"b": None}]}, "status": 200})
