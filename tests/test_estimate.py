"""Prompt estimates: text by characters, media by kind (never by base64 length), in every
provider's request shape; total and bounded on any input."""

from __future__ import annotations

import base64
import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_billing.core.estimate import (
    AUDIO_TOKENS_PER_SECOND,
    IMAGE_TOKENS,
    LOW_DETAIL_IMAGE_TOKENS,
    PDF_PAGE_TOKENS,
    UNKNOWN_DOCUMENT_PAGES,
    estimate_tokens,
    prompt_size,
    prompt_tokens,
)

IMAGE = base64.b64encode(os.urandom(300 * 1024)).decode()  # a 300 KiB image, 409,600 chars
PNG_URL = "data:image/png;base64," + IMAGE
QUESTION = "What is in this picture?"  # 24 characters: 6 tokens


def chat(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      *parts]}]}


def pdf_bytes(pages: int) -> bytes:
    objects = b"".join(b"%d 0 obj\n<< /Type /Page /Parent 1 0 R >>\nendobj\n" % (i + 2)
                       + os.urandom(2000) for i in range(pages))
    return b"%PDF-1.7\n1 0 obj\n<< /Type /Pages /Count 9 >>\nendobj\n" + objects + b"%%EOF"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_300_kib_image_in_a_chat_request_estimates_under_2000_tokens():
    body = chat({"type": "image_url", "image_url": {"url": PNG_URL}})
    assert prompt_tokens(body) < 2_000
    # the text strings ("user", "text", the question) plus one image
    assert prompt_tokens(body) == estimate_tokens(4 + 4 + len(QUESTION)) + IMAGE_TOKENS


TEXT = estimate_tokens(4 + 4 + len(QUESTION))  # role, "text" type, the question


@pytest.mark.parametrize(("part", "tokens"), [
    # OpenAI chat: data URL, http URL, low detail
    ({"type": "image_url", "image_url": {"url": PNG_URL, "detail": "high"}}, IMAGE_TOKENS),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
     IMAGE_TOKENS),
    ({"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
     LOW_DETAIL_IMAGE_TOKENS),
    ({"type": "image_url", "image_url": PNG_URL}, IMAGE_TOKENS),  # vLLM's shorthand
    # OpenAI chat audio: 320,000 bytes of WAV = 10 s of 16 kHz 16-bit mono
    ({"type": "input_audio", "input_audio": {"data": b64(bytes(320_000)), "format": "wav"}},
     10 * AUDIO_TOKENS_PER_SECOND),
    ({"type": "input_audio", "input_audio": {"data": b64(bytes(160_000)), "format": "mp3"}},
     10 * AUDIO_TOKENS_PER_SECOND),
    # OpenAI chat file: a 4-page PDF, and one only referenced by id
    ({"type": "file", "file": {"filename": "a.pdf",
                               "file_data": "data:application/pdf;base64," + b64(
                                   pdf_bytes(4))}}, 4 * PDF_PAGE_TOKENS),
    ({"type": "file", "file": {"file_id": "file-abc"}}, UNKNOWN_DOCUMENT_PAGES * PDF_PAGE_TOKENS),
    # Responses API
    ({"type": "input_image", "image_url": PNG_URL, "detail": "auto"}, IMAGE_TOKENS),
    ({"type": "input_image", "image_url": PNG_URL, "detail": "low"}, LOW_DETAIL_IMAGE_TOKENS),
    ({"type": "input_file", "filename": "b.pdf", "file_data": "data:application/pdf;base64,"
      + b64(pdf_bytes(2))}, 2 * PDF_PAGE_TOKENS),
    ({"type": "input_file", "filename": "b.pdf", "file_data": b64(pdf_bytes(3))},
     3 * PDF_PAGE_TOKENS),  # bare base64
    # Anthropic
    ({"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                  "data": IMAGE}}, IMAGE_TOKENS),
    ({"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
     IMAGE_TOKENS),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                     "data": b64(pdf_bytes(5))}}, 5 * PDF_PAGE_TOKENS),
    ({"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                     "data": "x" * 400}}, 100),
    # Gemini parts (camelCase and snake_case)
    ({"inlineData": {"mimeType": "image/png", "data": IMAGE}}, IMAGE_TOKENS),
    ({"inline_data": {"mime_type": "image/webp", "data": IMAGE}}, IMAGE_TOKENS),
    ({"inlineData": {"mimeType": "audio/wav", "data": b64(bytes(64_000))}},
     2 * AUDIO_TOKENS_PER_SECOND),
    ({"inlineData": {"mimeType": "text/plain", "data": b64(b"y" * 800)}}, 200),
    ({"fileData": {"mimeType": "image/png", "fileUri": "gs://b/cat.png"}}, IMAGE_TOKENS),
    # a data URL in a shape we do not know still counts as what it is
    ({"payload": {"attachment": PNG_URL}}, IMAGE_TOKENS),
])
def test_media_counts_by_kind_in_every_providers_shape(part: dict[str, Any], tokens: int):
    body = chat(part)
    text_only = prompt_tokens(chat())
    assert text_only == TEXT
    assert prompt_tokens(body) - text_only == tokens


def test_anthropic_and_gemini_requests_and_text_unchanged():
    anthropic = {"model": "claude-sonnet-4-5", "system": "Be brief.", "messages": [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": IMAGE}},
            {"type": "text", "text": QUESTION}]}]}
    assert prompt_tokens(anthropic) == estimate_tokens(
        len("Be brief.") + 4 + 4 + len(QUESTION)) + IMAGE_TOKENS
    gemini = {"contents": [{"role": "user", "parts": [
        {"text": QUESTION}, {"inlineData": {"mimeType": "image/jpeg", "data": IMAGE}}]}]}
    assert prompt_tokens(gemini) == estimate_tokens(4 + len(QUESTION)) + IMAGE_TOKENS
    text = {"messages": [{"role": "user", "content": "z" * 1000}], "tools": [{"name": "f"}]}
    assert prompt_tokens(text) == estimate_tokens(4 + 1000 + 1) == 252


def test_pdf_pages_are_counted_in_bounded_time_and_extrapolated():
    many = b64(pdf_bytes(1) * 6000)  # ~12 MB of PDF: past the 8 MiB scanned
    started = time.perf_counter()
    tokens = prompt_tokens({"contents": [{"parts": [
        {"inlineData": {"mimeType": "application/pdf", "data": many}}]}]})
    assert time.perf_counter() - started < 1.0
    assert tokens == pytest.approx(6000 * PDF_PAGE_TOKENS, rel=0.01)
    compressed = b64(b"%PDF-1.7\n" + os.urandom(50_000))  # pages in object streams
    assert prompt_tokens({"messages": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": compressed}}]}) == \
        UNKNOWN_DOCUMENT_PAGES * PDF_PAGE_TOKENS


def test_deep_and_wide_input_is_bounded():
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = [deep, {"type": "image_url"}]
    wide = {"messages": [{"type": "input_image", "image_url": PNG_URL}] * 100_000}
    started = time.perf_counter()
    assert prompt_tokens({"messages": deep}) >= 0
    assert prompt_tokens(wide) == 100_000 * IMAGE_TOKENS
    assert time.perf_counter() - started < 2.0


# --- Fuzz ----------------------------------------------------------------------------------

KEYS = ["type", "image_url", "url", "detail", "input_audio", "data", "format", "file",
        "file_data", "filename", "source", "media_type", "inlineData", "inline_data",
        "mimeType", "mime_type", "fileData", "file_data", "content", "text", "audio_url",
        "video_url", "messages", "contents", "input", "system"]
WORDS = ["image_url", "input_image", "image", "input_audio", "file", "input_file",
         "document", "base64", "text", "content", "url", "low", "wav", "mp3", "a.pdf",
         "application/pdf", "image/png", "audio/wav", "video/mp4", "text/plain", "=", "==",
         "data:image/png;base64,AAAA", "data:application/pdf;base64,JVBERi0=",
         "data:audio/wav;base64,", "data:;base64,", "data:,x", "data:text/plain,hi",
         "JVBERi0xLjQKL1R5cGUgL1BhZ2U=", "ab\u00e9=", "video_url", "audio_url"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.sampled_from(WORDS), st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)),
                                            inner, max_size=5)),
    max_leaves=40)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4))
def test_never_raises_never_negative(body: dict[str, Any]):
    tokens = prompt_tokens(body)
    assert isinstance(tokens, int) and tokens >= 0


@given(st.integers(0, 2_000_000), st.sampled_from(["image/png", "image/jpeg"]))
def test_an_images_estimate_does_not_depend_on_its_size(size: int, mime: str):
    data = "A" * (size // 3 * 4)
    shapes = [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
              {"type": "image", "source": {"type": "base64", "media_type": mime,
                                           "data": data}},
              {"inlineData": {"mimeType": mime, "data": data}}]
    for part in shapes:
        assert prompt_tokens({"messages": [part]}) == IMAGE_TOKENS


@settings(max_examples=100, deadline=None)
@given(json_values, st.integers(0, 5_000), st.booleans())
def test_any_nesting_depth_is_fine(value: Any, depth: int, in_dicts: bool):
    for _ in range(depth):
        value = {"content": value} if in_dicts else [value]
    started = time.perf_counter()
    assert prompt_tokens({"messages": value}) >= 0
    assert time.perf_counter() - started < 0.5


def test_the_prompt_bound_covers_any_tokenizer_of_text():
    """Every token is at least one UTF-8 byte: the bound is at least the text's bytes
    (keys of tool schemas included), whatever the script; media by kind, not by size."""
    text = "naïve 日本語 🐍 " * 50
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a_rather_long_property_name": {"type": "string"}}}}}]
    body = {"messages": [{"role": "user", "content": text}], "tools": tools}
    tokens, bound = prompt_size(body)
    assert bound >= len(text.encode()) + len("a_rather_long_property_name") > tokens
    image = "data:image/png;base64," + "A" * 400_000
    _, with_image = prompt_size({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}]}]})
    assert with_image < 5_000


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                    max_leaves=30))
def test_the_bound_is_never_below_the_estimate(value):
    tokens, bound = prompt_size({"messages": value})
    assert 0 <= tokens <= bound
