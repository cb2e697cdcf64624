"""Token estimates, for when a provider reports no usage (sans-I/O).

Only ever used where no count exists: holds before a request runs, and responses cut off
before their usage. Every billed estimate is flagged on its event.

Text counts as characters/4. Media counts by its kind, never by its base64 length (a
300 KiB image is ~400,000 base64 characters but under 2,000 tokens at any provider):

- image: 765 tokens, OpenAI's figure for a 1024x1024 image at high detail (85 + 4 tiles
  of 170); 85 with ``detail: low``. The same image is ~1,400 at Anthropic (pixels/750)
  and 1,032 at Gemini (4 tiles of 258).
- audio: 32 tokens per second (Gemini's documented rate; OpenAI's is ~10), its duration
  from its size: 32,000 bytes a second for WAV/PCM (16 kHz, 16-bit mono speech), else
  16,000 (128 kbit/s, e.g. MP3).
- video: 263 tokens per second (Gemini: 258 per frame at 1 fps plus 32 of audio), at
  250,000 bytes a second (2 Mbit/s).
- PDF: 1,500 tokens per page (text plus page image), pages counted as ``/Type /Page``
  objects in the first 8 MiB (extrapolated past it); 3 pages when none are found
  (compressed object streams, base64 with line breaks) or the file is only referenced.
- text files (text/*, JSON, XML): their decoded size / 4. Other files: as a 3-page PDF.
- media only referenced (http URL, file id, Gemini ``fileData``): images as above, audio
  and video as one minute, documents as 3 pages.

Shapes recognised: OpenAI chat ``image_url``, ``input_audio``, ``file`` (and vLLM's
``audio_url``/``video_url``), Responses API ``input_image``/``input_file``, Anthropic
``image``/``document`` blocks, Gemini ``inlineData``/``fileData`` parts, and a ``data:``
URL anywhere. Pure and total: any JSON value in, a non-negative int out, in time linear
in the body and bounded per document.
"""

from __future__ import annotations

import binascii
import math
import re
from typing import Any

CHARS_PER_TOKEN = 4  # the usual rough ratio for English text

IMAGE_TOKENS = 765
LOW_DETAIL_IMAGE_TOKENS = 85
AUDIO_TOKENS_PER_SECOND = 32
PCM_BYTES_PER_SECOND = 32_000
COMPRESSED_AUDIO_BYTES_PER_SECOND = 16_000
VIDEO_TOKENS_PER_SECOND = 263
VIDEO_BYTES_PER_SECOND = 250_000
UNKNOWN_MEDIA_SECONDS = 60
PDF_PAGE_TOKENS = 1_500
UNKNOWN_DOCUMENT_PAGES = 3
PDF_SCAN_BYTES = 8 * 1024 * 1024  # bounds the work per document

MAX_DEPTH = 32
MEDIA_BOUND_FACTOR = 4  # media, in prompt_bound: this many times its estimate
CHAT_TEMPLATE_TOKENS = 8  # a chat template's special tokens per turn, generously
REQUEST_TEMPLATE_TOKENS = 16  # and per request (BOS, the assistant turn's header)
PROMPT_FIELDS = ("messages", "system", "prompt", "input", "instructions", "tools", "contents",
                 "systemInstruction")

_PCM_FORMATS = ("wav", "wave", "x-wav", "pcm", "pcm16", "l16", "aiff", "x-aiff")
_TEXT_TYPES = ("application/json", "application/xml", "application/x-ndjson")
_TEXT_EXTENSIONS = (".txt", ".md", ".csv", ".json", ".jsonl", ".xml", ".html", ".py")
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def prompt_tokens(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a request: its text's characters/4 plus its media by kind."""
    tally = _tally(body)
    return estimate_tokens(tally.chars) + tally.tokens


def prompt_size(body: dict[str, Any]) -> tuple[int, int]:
    """``(prompt_tokens(body), bound)`` in one pass. The bound is at most how many prompt
    tokens the request can be (what a blocking quota holds before it runs): every token of
    text is at least one UTF-8 byte of it (keys included: tool schemas are rendered into
    the prompt), a chat template adds a few tokens per turn, and media counts
    ``MEDIA_BOUND_FACTOR`` times its estimate — providers count the same image very
    differently, so for media the bound is a generous figure, not a proof."""
    tally = _tally(body)
    messages = body.get("messages") or body.get("contents") or body.get("input")
    turns = len(messages) if isinstance(messages, list) else 1
    bound = (tally.text_bytes + MEDIA_BOUND_FACTOR * tally.tokens
             + CHAT_TEMPLATE_TOKENS * turns + REQUEST_TEMPLATE_TOKENS)
    return estimate_tokens(tally.chars) + tally.tokens, bound


def _tally(body: dict[str, Any]) -> _Tally:
    tally = _Tally()
    for key in PROMPT_FIELDS:
        tally.add(body.get(key), 0)
    return tally


class _Tally:
    """Text characters (and UTF-8 bytes, keys included) and media tokens of a JSON value."""

    __slots__ = ("chars", "text_bytes", "tokens")

    def __init__(self) -> None:
        self.chars = 0
        self.text_bytes = 0
        self.tokens = 0

    def add(self, value: Any, depth: int) -> None:
        if isinstance(value, str):
            if (blob := _data_url(value)) is not None:
                self.tokens += _blob_tokens(*blob)
            else:
                self.chars += len(value)
                self.text_bytes += _utf8_size(value)
        elif depth > MAX_DEPTH:
            return
        elif isinstance(value, dict):
            if not self._media(value, depth):
                for key, item in value.items():
                    self.text_bytes += _utf8_size(key) if isinstance(key, str) else 0
                    self.add(item, depth + 1)
        elif isinstance(value, list):
            for item in value:
                self.add(item, depth + 1)

    def _media(self, part: dict[str, Any], depth: int) -> bool:
        """Count ``part`` if it is a media part; False when it is not one."""
        tokens = _part_tokens(part)
        if tokens is None and part.get("type") == "document":  # Anthropic
            source = _dict(part.get("source"))
            if source.get("type") == "text":
                self.add(source.get("data"), depth + 1)
                return True
            if source.get("type") == "content":
                self.add(source.get("content"), depth + 1)
                return True
            data = source.get("data") if source.get("type") == "base64" else None
            tokens = _blob_tokens(_str(source.get("media_type")) or "application/pdf", data)
        if tokens is None:
            return False
        self.tokens += tokens
        return True


def _part_tokens(part: dict[str, Any]) -> int | None:
    """Tokens of an image, audio, video or file part; None when ``part`` is none of them."""
    match part.get("type"):
        case "image_url":  # OpenAI chat: {"url": ..., "detail": ...} (vLLM: or the URL)
            return _image_tokens(_dict(part.get("image_url")).get("detail"))
        case "input_image":  # Responses API
            return _image_tokens(part.get("detail"))
        case "image":  # Anthropic, whatever its source
            return IMAGE_TOKENS
        case "input_audio":  # OpenAI: {"data": base64, "format": "wav" | "mp3"}
            audio = _dict(part.get("input_audio"))
            return _audio_tokens(_base64_size(audio.get("data")), _str(audio.get("format")))
        case "audio_url" | "video_url":  # vLLM
            url = part.get(part["type"])
            url = _dict(url).get("url") if isinstance(url, dict) else url
            kind = "audio/*" if part["type"] == "audio_url" else "video/*"
            return _blob_tokens(*(_data_url(_str(url)) or (kind, None)))
        case "file":  # OpenAI chat: {"file_data": data URL, "filename": ...} or a file_id
            file = _dict(part.get("file"))
            return _file_tokens(file.get("file_data"), file.get("filename"))
        case "input_file":  # Responses API
            return _file_tokens(part.get("file_data"), part.get("filename"))
    for name in ("inlineData", "inline_data"):  # Gemini, base64 in the request
        if isinstance(blob := part.get(name), dict):
            mime = _str(blob.get("mimeType") or blob.get("mime_type"))
            return _blob_tokens(mime, blob.get("data"))
    for name in ("fileData", "file_data"):  # Gemini, by URI
        if isinstance(ref := part.get(name), dict):
            return _blob_tokens(_str(ref.get("mimeType") or ref.get("mime_type")), None)
    return None


def _image_tokens(detail: Any) -> int:
    return LOW_DETAIL_IMAGE_TOKENS if detail == "low" else IMAGE_TOKENS


def _audio_tokens(size: int | None, audio_format: str) -> int:
    if size is None:
        return UNKNOWN_MEDIA_SECONDS * AUDIO_TOKENS_PER_SECOND
    rate = PCM_BYTES_PER_SECOND if audio_format.lower() in _PCM_FORMATS \
        else COMPRESSED_AUDIO_BYTES_PER_SECOND
    return math.ceil(size / rate * AUDIO_TOKENS_PER_SECOND)


def _video_tokens(size: int | None) -> int:
    seconds = UNKNOWN_MEDIA_SECONDS if size is None else size / VIDEO_BYTES_PER_SECOND
    return math.ceil(seconds * VIDEO_TOKENS_PER_SECOND)


def _file_tokens(file_data: Any, filename: Any) -> int:
    """An OpenAI file part: a data URL, bare base64 typed by its filename, or a file id."""
    if isinstance(file_data, str) and (blob := _data_url(file_data)) is not None:
        return _blob_tokens(*blob)
    text = _str(filename).lower().endswith(_TEXT_EXTENSIONS)
    return _blob_tokens("text/plain" if text else "application/pdf", file_data)


def _blob_tokens(mime: str, data: Any) -> int:
    """Tokens of base64 ``data`` (None: only referenced) of MIME type ``mime``."""
    kind, _, subtype = mime.lower().partition(";")[0].strip().partition("/")
    size = _base64_size(data)
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "audio":
        return _audio_tokens(size, subtype)
    if kind == "video":
        return _video_tokens(size)
    if size is not None and (kind == "text" or f"{kind}/{subtype}" in _TEXT_TYPES):
        return estimate_tokens(size)
    pages = _pdf_pages(data) if subtype == "pdf" else 0
    return (pages or UNKNOWN_DOCUMENT_PAGES) * PDF_PAGE_TOKENS


def _pdf_pages(data: Any) -> int:
    """Page objects in a base64 PDF, counted in its first PDF_SCAN_BYTES; 0 if unknown."""
    size = _base64_size(data)
    if not size:
        return 0
    chars = min(len(data), PDF_SCAN_BYTES // 3 * 4) // 4 * 4
    try:
        head = binascii.a2b_base64(data[:chars])
    except ValueError:  # not base64 (binascii.Error), or not ASCII
        return 0
    pages = len(_PDF_PAGE.findall(head))
    return math.ceil(pages * size / len(head)) if head else 0


def _data_url(value: str) -> tuple[str, str] | None:
    """``(mime, base64 data)`` of a base64 ``data:`` URL; None for anything else (a
    percent-encoded data URL is counted as text)."""
    if not value.startswith("data:"):
        return None
    header, comma, _ = value[5:256].partition(",")
    mime, _, params = header.partition(";")
    if not comma or "base64" not in params.split(";"):
        return None
    return mime, value[5 + len(header) + 1:]


def _base64_size(data: Any) -> int | None:
    """Decoded size of base64 text, from its length alone."""
    if not isinstance(data, str):
        return None
    padding = len(data[-2:]) - len(data[-2:].rstrip("="))
    return max(0, len(data) * 3 // 4 - padding)


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
