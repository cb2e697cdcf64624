"""core/backend_tokenizer.py: which calls count a response, per server, and config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from llm_billing.backend_tokenizer import BackendTokenizer
from llm_billing.core.backend_tokenizer import (
    METHOD,
    CountedUsage,
    TokenizeCall,
    TokenizerError,
    UsageFallback,
    parse_usage_fallback,
    render_chat,
    usage_calls,
)
from llm_billing.core.config import ConfigError, parse_config
from llm_billing.core.outcome import Outcome
from llm_billing.core.request import Caller, RequestContext
from llm_billing.core.sse import SSEParser
from llm_billing.core.stream_meter import StreamMeter
from llm_billing.core.usage import MAX_KEPT_TEXT, Protocol, Usage, UsageTracker

CHAT = Protocol.OPENAI_CHAT
COMPLETIONS = Protocol.OPENAI_COMPLETIONS
MESSAGES = [{"role": "user", "content": "hi"}]


def run(fallback: UsageFallback, protocol: Protocol, request: dict[str, Any], output: str,
        answers: list[Any]) -> tuple[list[TokenizeCall], CountedUsage]:
    """Drive the generator with canned answers; the calls it made and its result."""
    calls, gen, answer = [], usage_calls(fallback, protocol, request, output), None
    try:
        while True:
            calls.append(gen.send(answer))
            answer = answers.pop(0)
    except StopIteration as end:
        assert not answers, "answers left over"
        return calls, end.value


def test_vllm_counts_a_chat_with_its_template_and_the_output_without_specials():
    request = {"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}],
               "stream_options": {"include_usage": True}}
    calls, counted = run(UsageFallback("vllm"), CHAT, request, "Hello",
                         [{"count": 12}, {"count": 7}, {"count": 2}])
    assert calls == [
        TokenizeCall("/tokenize", {"model": "m", "messages": MESSAGES,
                                   "add_generation_prompt": True,
                                   "tools": [{"type": "function"}]}),
        TokenizeCall("/tokenize", {"model": "m", "prompt": "\nHello",
                                   "add_special_tokens": False}),
        TokenizeCall("/tokenize", {"model": "m", "prompt": "\n",
                                   "add_special_tokens": False})]
    assert counted == CountedUsage(12, 5, exact=True) and counted.method == METHOD


def test_vllm_completions_count_each_prompt_and_token_ids_as_they_are():
    calls, counted = run(UsageFallback("vllm"), COMPLETIONS,
                         {"model": "m", "prompt": ["a", [1, 2, 3]]}, "x",
                         [{"count": 2}, {"count": 3}, {"count": 2}])
    assert calls[0] == TokenizeCall("/tokenize", {"model": "m", "prompt": "a"})
    assert counted == CountedUsage(2 + 3, 1, exact=True)
    _, counted = run(UsageFallback("vllm"), COMPLETIONS, {"prompt": [5, 6]}, "", [])
    assert counted.prompt_tokens == 2


def test_llama_server_renders_with_apply_template_then_tokenizes_with_specials():
    calls, counted = run(UsageFallback("llama-server"), CHAT, {"messages": MESSAGES}, " Hi",
                         [{"prompt": "<|user|>hi"}, {"tokens": [1] * 9}, {"tokens": [7, 8, 9]},
                          {"tokens": [7]}])
    assert calls == [
        TokenizeCall("/apply-template", {"messages": MESSAGES}),
        TokenizeCall("/tokenize", {"content": "<|user|>hi", "add_special": True,
                                   "parse_special": True}),
        TokenizeCall("/tokenize", {"content": "a Hi", "add_special": False,  # starts with
                                   "parse_special": False}),                  # a space
        TokenizeCall("/tokenize", {"content": "a", "add_special": False,
                                   "parse_special": False})]
    assert counted == CountedUsage(9, 2, exact=True)


def test_llama_cpp_python_takes_off_the_bos_its_count_always_adds():
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    fallback = parse_usage_fallback({"type": "tokenize", "api": "llama-cpp-python",
                                     "chat_template": template}, "b")
    calls, counted = run(fallback, CHAT, {"model": "m", "messages": MESSAGES}, "Hello",
                         [{"count": 8}, {"count": 3}, {"count": 11}, {"count": 1}])
    assert [c.body["input"] for c in calls] == ["\nHello", "\n", "<s>[user]hi", ""]
    assert all(c.path == "/extras/tokenize/count" for c in calls)
    assert counted == CountedUsage(10, 5, exact=True)
    # A completion's prompt keeps its BOS, as the server counts it.
    _, counted = run(fallback, COMPLETIONS, {"prompt": "abc"}, "d",
                     [{"count": 4}, {"count": 3}, {"count": 4}])
    assert counted == CountedUsage(4, 1, exact=True)


def test_llama_cpp_python_without_a_template_counts_the_texts_and_says_so():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "image_url", "image_url": {}}]},
                {"role": "assistant", "content": "b"}]
    calls, counted = run(UsageFallback("llama-cpp-python"), CHAT, {"messages": messages}, "",
                         [{"count": 4}, {"count": 1}])
    assert calls[0].body["input"] == "a\nb"
    assert counted == CountedUsage(3, 0, exact=False)
    assert "without the chat template" in counted.method


def test_render_chat_is_llama_cpp_pythons_jinja():
    """trim_blocks/lstrip_blocks, loop controls, raise_exception, bos/eos, generation prompt."""
    template = ("{% for m in messages %}\n  {% if m.role == 'x' %}{% break %}{% endif %}\n"
                "{{ bos_token }}{{ m.content }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}A:{% endif %}")
    fallback = UsageFallback("llama-cpp-python", template, "<B>", "<E>")
    request = {"messages": [{"role": "u", "content": "1"}, {"role": "x", "content": "2"}]}
    assert render_chat(fallback, request) == "<B>1<E>\nA:"
    raising = UsageFallback("llama-cpp-python", "{{ raise_exception('no system role') }}")
    with pytest.raises(TokenizerError, match="no system role"):
        render_chat(raising, request)
    sandboxed = UsageFallback("llama-cpp-python", "{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError):
        render_chat(sandboxed, request)


@pytest.mark.parametrize("answers", [[{}], [{"count": -1}], [{"count": True}], ["x"],
                                     [{"count": 1}, {"tokens": None}]])
def test_an_odd_answer_is_a_tokenizer_error(answers):
    api = "llama-server" if len(answers) == 2 else "vllm"
    request = {"prompt": "p"} if api == "llama-server" else {"messages": MESSAGES}
    protocol = COMPLETIONS if api == "llama-server" else CHAT
    answers = [{"tokens": [1]}, answers[1]] if api == "llama-server" else answers
    with pytest.raises(TokenizerError):
        run(UsageFallback(api), protocol, request, "o", answers)


@pytest.mark.parametrize("request_body", [{"messages": "hi"}, {}])
def test_a_request_without_messages_cannot_be_counted(request_body):
    with pytest.raises(TokenizerError):
        run(UsageFallback("vllm"), CHAT, request_body, "", [])
    with pytest.raises(TokenizerError):
        run(UsageFallback("vllm"), COMPLETIONS, {"prompt": {"a": 1}}, "", [])


@pytest.mark.parametrize("item, error", [
    ("tokenize", "must be \"estimate\" or a table"),
    ({"type": "tokenize"}, ".api: must be one of vllm, llama-server, llama-cpp-python"),
    ({"type": "tokenize", "api": "tgi"}, ".api: must be one of"),
    ({"type": "tokenize", "api": "vllm", "chat_template": "x"}, "only for llama-cpp-python"),
    ({"type": "tokenize", "api": "llama-cpp-python", "chat_template": "{% for %}"},
     "chat_template:"),
    ({"type": "tokenize", "api": "vllm", "url": "x"}, "unknown key 'url'"),
    ({"type": "tokenize", "api": "llama-cpp-python", "bos_token": 1}, "bos_token: must be"),
])
def test_config_errors_name_the_key(item, error):
    backend = f'''
[[backends]]
name = "b"
url = "http://127.0.0.1:1"
models = ["m"]
usage_fallback = {_toml(item)}
'''
    with pytest.raises(ConfigError, match=r"backends\[0\]\.usage_fallback") as raised:
        parse_config(backend, {})
    assert error in str(raised.value)


def _toml(item: Any) -> str:
    if isinstance(item, str):
        return f'"{item}"'
    parts = ", ".join(f'{k} = {_toml(v) if isinstance(v, str) else v}' for k, v in item.items())
    return "{ " + parts + " }"


def test_the_default_is_the_estimate_and_the_shipped_config_loads():
    config = parse_config('[[backends]]\nname = "b"\nurl = "http://h"\nmodels = ["m"]\n', {})
    assert config.backends[0].usage_fallback == UsageFallback()


def test_the_tracker_keeps_delivered_text_only_when_asked_and_up_to_a_cap():
    events = [b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n',
              b'data: {"choices":[{"delta":{"reasoning_content":"r"}}]}\n\n',
              b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n', b"data: [DONE]\n\n"]
    kept, plain = UsageTracker(CHAT, keep_text=True), UsageTracker(CHAT)
    for tracker in (kept, plain):
        parser = SSEParser()
        for data in events:
            for block in parser.feed(data):
                if block.event is not None:
                    tracker.observe_event(block.event)
    assert kept.output_text == "Helrlo" and kept.output_chars == plain.output_chars == 6
    assert plain.output_text is None
    huge = UsageTracker(Protocol.OPENAI_COMPLETIONS, keep_text=True)
    huge.observe_body(b'{"choices":[{"text":"' + b"x" * (MAX_KEPT_TEXT + 1) + b'"}]}')
    assert huge.output_text is None and huge.output_chars == MAX_KEPT_TEXT + 1


# --- the addon: whatever the backend answers, the flow is settled exactly once ----------

def settled_outcome(answer: Callable[[httpx.Request], httpx.Response], template: str,
                    secrets: tuple[str, ...] = ()) -> list[Outcome]:
    """Settle one streamed llama-cpp-python chat without usage through BackendTokenizer,
    its backend answering with ``answer``; the outcomes handed to settle."""
    return settle_counted(answer, "usage_fallback = { type = \"tokenize\", api = "
                          f"\"llama-cpp-python\", chat_template = \"{template}\" }}", secrets)


def settle_counted(answer: Callable[[httpx.Request], httpx.Response], backend_toml: str,
                   secrets: tuple[str, ...] = ()) -> list[Outcome]:
    """Settle one streamed chat without usage through BackendTokenizer, its backend (one
    configured with ``backend_toml``'s lines) answering with ``answer``."""
    config = parse_config(f'''
[[backends]]
name = "b"
url = "http://127.0.0.1:9"
models = ["m"]
{backend_toml}
''', {})
    backend = config.backends[0]
    rc = RequestContext(Caller("k", "u"), config.routes["/v1/chat/completions"],
                        "/v1/chat/completions", backend=backend, model="m", secrets=secrets,
                        tokenizer_input={"model": "m", "messages": MESSAGES})
    rc.meter = StreamMeter(CHAT, sse=True, content_encoding="", hide_usage_chunk=False,
                           keep_text=True)
    rc.meter(b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\ndata: [DONE]\n\n')
    rc.meter(b"")
    estimate = Outcome(status=200, usage=Usage(3, 2), estimated=True,
                       estimate_method="output: delivered characters/4", complete=True)
    tokenizer = BackendTokenizer(httpx.MockTransport(answer))
    results: list[Outcome] = []

    async def go() -> None:
        assert tokenizer.wants(rc, estimate)
        tokenizer.count_later(rc, estimate, results.append)
        await tokenizer.done()

    asyncio.run(go())
    return results


def counts(values: list[int]) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, json={"count": values.pop(0)})


def test_the_backends_counts_are_settled():
    [outcome] = settled_outcome(counts([8, 3, 12, 1]), "{{ bos_token }}{{ messages[0].content }}")
    assert outcome.usage == Usage(11, 5) and not outcome.estimated
    assert outcome.estimate_method == METHOD


@pytest.mark.parametrize("answer, template, reason", [
    (counts([8, 3]), "{{ messages[0].content + 1 }}", "TypeError"),  # not a TemplateError
    (counts([8, 3, 10**12]), "x", "the tokenizer answered without a 'count'"),
    (counts([8, 3, 2, 5]), "x", "the tokenizer's counts do not add up (-3, 5)"),
    (lambda request: httpx.Response(200, text="not json"), "x", "JSONDecodeError"),
    (lambda request: httpx.Response(500), "x", "/extras/tokenize/count answered 500"),
])
def test_whatever_goes_wrong_the_estimate_is_settled_once(answer, template, reason):
    [outcome] = settled_outcome(answer, template)
    assert outcome.usage == Usage(3, 2) and outcome.estimated
    assert outcome.estimate_method.startswith(
        f"output: delivered characters/4; backend tokenizer failed: {reason}")


def test_a_failure_quoting_a_secret_has_it_redacted():
    secret = "sk-upstream-" + "q" * 24
    [outcome] = settled_outcome(lambda request: httpx.Response(200, json={"count": secret}),
                                "x", secrets=(secret,))
    assert secret not in outcome.estimate_method and "<redacted>" in outcome.estimate_method


def test_a_failure_quoting_a_secret_at_its_cut_leaves_no_part_of_it():
    """The answer quoted is cut short: cut through a secret, the part left must not stay."""
    secret = "sk-upstream-" + "q" * 24
    answer = {"count": "x" * 170 + secret}  # the cut (200 characters) falls inside it
    [outcome] = settled_outcome(lambda request: httpx.Response(200, json=answer),
                                "x", secrets=(secret,))
    assert secret[:12] not in outcome.estimate_method


def test_a_chat_template_is_compiled_once_not_per_request(monkeypatch):
    """Compiling a template takes ~10 ms on the event loop; rendering takes ~0.05 ms."""
    from llm_billing.core import backend_tokenizer
    compiled = []
    environment = backend_tokenizer._environment

    def counting() -> Any:
        compiled.append(1)
        return environment()
    monkeypatch.setattr(backend_tokenizer, "_environment", counting)
    fallback = UsageFallback("llama-cpp-python", "{{ messages[0].content }} once")
    for _ in range(3):
        assert render_chat(fallback, {"messages": MESSAGES}) == "hi once"
    assert len(compiled) <= 1


def test_a_query_credential_never_reaches_the_log(caplog):
    """httpx logs each request's URL at INFO, query included: the backend's key with it."""
    secret = "sk-tokenizer-" + "z" * 24
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"count": 4})

    with caplog.at_level(logging.DEBUG):
        results = settle_counted(
            answer, f'auth = {{ type = "query", name = "key", value = "{secret}" }}\n'
                    'usage_fallback = { type = "tokenize", api = "vllm" }')
    assert results and sent and sent[0].url.params["key"] == secret
    assert secret not in caplog.text


def test_a_large_batch_of_prompts_is_estimated_not_counted_one_call_each():
    prompts = [f"p{i}" for i in range(65)]
    with pytest.raises(TokenizerError, match="a batch of 65 prompts"):
        run(UsageFallback("vllm"), COMPLETIONS, {"prompt": prompts}, "", [])
    calls, _ = run(UsageFallback("vllm"), COMPLETIONS, {"prompt": prompts[:64]}, "",
                   [{"count": 1}] * 64)
    assert len(calls) == 64
    _, counted = run(UsageFallback("vllm"), COMPLETIONS, {"prompt": list(range(500))}, "", [])
    assert counted.prompt_tokens == 500  # token ids: nothing to call
