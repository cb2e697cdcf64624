"""Counting a response's tokens with its backend's own tokenizer (sans-I/O).

Self-hosted servers do not always report usage: llama-cpp-python's server never does in a
stream. They do expose their tokenizer, so when a response ends without usage and its
backend's ``usage_fallback`` says ``tokenize``, the proxy asks the backend to count:

- vLLM ``POST /tokenize`` takes chat ``messages`` and applies the model's chat template
  itself, or a ``prompt``; it answers ``count``. Exact.
- llama.cpp's ``llama-server``: ``POST /apply-template`` renders the chat, ``POST
  /tokenize`` counts it with the specials the server adds to a prompt. Exact.
- llama-cpp-python's server: ``POST /extras/tokenize/count`` counts a text, always with
  the BOS token (counted once, on ``""``, and taken off). It cannot render a chat: the
  backend's ``chat_template`` (its GGUF's ``tokenizer.chat_template``) is rendered here as
  llama-cpp-python does (sandboxed Jinja). Exact for completions and for chats with the
  template given; without it the prompt is the messages' text alone, and flagged estimated.

``usage_calls`` is a generator: it yields the ``TokenizeCall`` to make and is sent each
call's JSON answer; it returns the ``CountedUsage``. The I/O is the caller's
(addons/llm_billing/backend_tokenizer.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from jinja2 import Template, TemplateError, ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .usage import MAX_TOKENS, Protocol
from .validation import ConfigValueError

TOKENIZER_APIS = ("vllm", "llama-server", "llama-cpp-python")
METHOD = "backend tokenizer"
METHOD_NO_TEMPLATE = (f"{METHOD}; prompt: the messages' text without the chat template "
                      "(set usage_fallback.chat_template for exact counts)")
MAX_PROMPTS = 64  # texts in one completions request counted one call each
COUNTED_PROTOCOLS = (Protocol.OPENAI_CHAT, Protocol.OPENAI_COMPLETIONS)
# What a chat request may carry that changes how its template renders.
_TEMPLATE_FIELDS = ("tools", "chat_template_kwargs", "add_generation_prompt",
                    "continue_final_message", "documents")


class TokenizerError(Exception):
    """The backend's tokenizer could not count (its answer says why, quoted in full: cut
    only once redacted, or a secret cut through would keep its head)."""


@dataclass(frozen=True, slots=True)
class UsageFallback:
    """A backend's ``usage_fallback``: how to bill a response that reports no usage."""

    tokenizer: str | None = None  # one of TOKENIZER_APIS; None: estimate from characters
    chat_template: str | None = None  # llama-cpp-python only: the GGUF's chat template
    bos_token: str = "<s>"
    eos_token: str = "</s>"


ESTIMATE = UsageFallback()


@dataclass(frozen=True, slots=True)
class TokenizeCall:
    path: str  # appended to the backend's URL prefix
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CountedUsage:
    prompt_tokens: int
    completion_tokens: int
    exact: bool

    @property
    def method(self) -> str:
        return METHOD if self.exact else METHOD_NO_TEMPLATE


def parse_usage_fallback(item: Any, where: str) -> UsageFallback:
    """``"estimate"``, or a table ``{ type = "tokenize", api = "vllm" }`` (also
    ``"llama-server"``, ``"llama-cpp-python"`` with an optional ``chat_template``,
    ``bos_token`` and ``eos_token``)."""
    if item == "estimate" or item == {"type": "estimate"}:
        return ESTIMATE
    if not isinstance(item, dict) or item.get("type") != "tokenize":
        raise ConfigValueError(f'{where}: must be "estimate" or a table like '
                               '{ type = "tokenize", api = "vllm" }')
    unknown = set(item) - {"type", "api", "chat_template", "bos_token", "eos_token"}
    if unknown:
        raise ConfigValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    api = item.get("api")
    if api not in TOKENIZER_APIS:
        raise ConfigValueError(f"{where}.api: must be one of {', '.join(TOKENIZER_APIS)}")
    template = item.get("chat_template")
    if template is not None:
        if api != "llama-cpp-python":
            raise ConfigValueError(f"{where}.chat_template: only for llama-cpp-python "
                                   f"({api} applies its model's template itself)")
        if not isinstance(template, str) or not template:
            raise ConfigValueError(f"{where}.chat_template: must be a non-empty string")
        try:
            _environment().from_string(template)
        except TemplateError as e:
            raise ConfigValueError(f"{where}.chat_template: {e}") from None
    tokens = {}
    for name in ("bos_token", "eos_token"):
        if name in item:
            if not isinstance(item[name], str):
                raise ConfigValueError(f"{where}.{name}: must be a string")
            tokens[name] = item[name]
    return UsageFallback(api, template, **tokens)


def usage_calls(fallback: UsageFallback, protocol: Protocol, request: dict[str, Any],
                output: str) -> Generator[TokenizeCall, Any, CountedUsage]:
    """The calls that count ``request``'s prompt and the delivered ``output``."""
    model = request.get("model")
    if fallback.tokenizer == "vllm":
        prompt = yield from _vllm_prompt(protocol, request, model)
        completion = yield from _generated(lambda text: TokenizeCall("/tokenize", {
            "model": model, "prompt": text, "add_special_tokens": False}),
            lambda answer: _count(answer, "count"), output)
        return _counted(prompt, completion, exact=True)
    if fallback.tokenizer == "llama-server":
        prompt = yield from _llama_server_prompt(protocol, request)
        completion = yield from _generated(lambda text: TokenizeCall("/tokenize", {
            "content": text, "add_special": False, "parse_special": False}), _tokens, output)
        return _counted(prompt, completion, exact=True)
    if fallback.tokenizer == "llama-cpp-python":
        def count(text: str) -> TokenizeCall:
            return TokenizeCall("/extras/tokenize/count", {"model": model, "input": text})

        def counted(answer: Any) -> int:
            return _count(answer, "count")
        completion = yield from _generated(count, counted, output)
        if protocol is Protocol.OPENAI_COMPLETIONS:  # counted with its BOS, as the server does
            prompt = 0
            for text in _prompts(request.get("prompt")):
                prompt += text if isinstance(text, int) else counted((yield count(text)))
            return _counted(prompt, completion, exact=True)
        rendered = render_chat(fallback, request)
        exact = rendered is not None
        if rendered is None:
            rendered = "\n".join(_message_texts(request.get("messages")))
        # Its count always adds a BOS; a rendered template holds its own (the server adds
        # none then): the BOS alone is counted and taken off.
        prompt = counted((yield count(rendered))) - counted((yield count("")))
        return _counted(prompt, completion, exact)
    raise TokenizerError("no tokenizer configured")


def _generated(call: Callable[[str], TokenizeCall], tokens: Callable[[Any], int],
               text: str) -> Generator[TokenizeCall, Any, int]:
    """The tokens of generated ``text``, counted as the continuation they were: after an
    anchor, less the anchor's count. A text counted on its own would be a new text: an
    SPM tokenizer (llama, mistral) puts a space before it — one token more, or three
    in a vocabulary of bytes. The anchor never merges with what follows it: a newline
    before a text that starts with no whitespace, else a letter."""
    if not text:
        return 0
    anchor = "a" if text[0].isspace() else "\n"
    return tokens((yield call(anchor + text))) - tokens((yield call(anchor)))


def _vllm_prompt(protocol: Protocol, request: dict[str, Any],
                 model: Any) -> Generator[TokenizeCall, Any, int]:
    if protocol is Protocol.OPENAI_CHAT:
        body = {"model": model, "messages": _messages(request), "add_generation_prompt": True}
        body.update({k: request[k] for k in _TEMPLATE_FIELDS if k in request})
        return _count((yield TokenizeCall("/tokenize", body)), "count")
    total = 0
    for text in _prompts(request.get("prompt")):
        if isinstance(text, int):
            total += text
        else:
            total += _count((yield TokenizeCall("/tokenize", {"model": model, "prompt": text})),
                            "count")
    return total


def _llama_server_prompt(protocol: Protocol,
                         request: dict[str, Any]) -> Generator[TokenizeCall, Any, int]:
    texts: list[str | int]
    if protocol is Protocol.OPENAI_CHAT:
        body = {"messages": _messages(request)}
        body.update({k: request[k] for k in _TEMPLATE_FIELDS if k in request})
        answer = yield TokenizeCall("/apply-template", body)
        rendered = answer.get("prompt") if isinstance(answer, dict) else None
        if not isinstance(rendered, str):
            raise TokenizerError(f"/apply-template answered without a prompt: {answer!r}")
        texts = [rendered]
    else:
        texts = _prompts(request.get("prompt"))
    total = 0
    for text in texts:  # a chat prompt and a completion prompt both get the server's specials
        total += text if isinstance(text, int) else _tokens(
            (yield TokenizeCall("/tokenize", {"content": text, "add_special": True,
                                              "parse_special": True})))
    return total


def render_chat(fallback: UsageFallback, request: dict[str, Any]) -> str | None:
    """The chat prompt as llama-cpp-python renders it with ``fallback.chat_template``;
    None without a template."""
    if fallback.chat_template is None:
        return None

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    variables = {k: request[k] for k in ("tools", "functions", "tool_choice", "function_call")
                 if k in request}
    try:
        return _template(fallback.chat_template).render(
            messages=_messages(request), bos_token=fallback.bos_token,
            eos_token=fallback.eos_token, add_generation_prompt=True,
            raise_exception=raise_exception, **variables)
    except TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from None


@functools.lru_cache(maxsize=16)
def _template(source: str) -> Template:
    """Compiled once: ~10 ms on the event loop, per request otherwise."""
    return _environment().from_string(source)


def _environment() -> ImmutableSandboxedEnvironment:
    # llama-cpp-python's Jinja2ChatFormatter's settings.
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                         extensions=[ext.loopcontrols])


def _messages(request: dict[str, Any]) -> list[Any]:
    messages = request.get("messages")
    if not isinstance(messages, list):
        raise TokenizerError("the request has no messages")
    return messages


def _message_texts(messages: Any) -> list[str]:
    texts = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part["text"] for part in content
                      if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return texts


def _prompts(prompt: Any) -> list[str | int]:
    """A completion's prompt as texts to count, or counts already known (token ids). A
    batch of more than ``MAX_PROMPTS`` texts is estimated: one call each would hold a
    slot of the backend's tokenizer for the whole budget, and others' counts behind it."""
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS and \
            not all(isinstance(p, int) for p in prompt):
        raise TokenizerError(f"a batch of {len(prompt)} prompts (over {MAX_PROMPTS})")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [len(prompt)]
    if isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt):
        return [p if isinstance(p, str) else len(p) for p in prompt]
    raise TokenizerError("the request's prompt is not text or token ids")


def _count(answer: Any, key: str) -> int:
    value = answer.get(key) if isinstance(answer, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise TokenizerError(f"the tokenizer answered without a {key!r}: {answer!r}")
    return value


def _tokens(answer: Any) -> int:
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        raise TokenizerError(f"the tokenizer answered without 'tokens': {answer!r}")
    return len(tokens)


def _counted(prompt: int, completion: int, exact: bool) -> CountedUsage:
    if prompt < 0 or completion < 0:  # a BOS taken off a count that lacked it
        raise TokenizerError(f"the tokenizer's counts do not add up ({prompt}, {completion})")
    return CountedUsage(prompt, completion, exact)
