"""A GGUF's own chat template, rendered the way transformers renders a tokenizer's.

An instruct model is trained on prompts in its chat format (Qwen: ``<|im_start|>user ... <|im_end|>``); a GGUF
carries that format as a Jinja template in its metadata (``tokenizer.chat_template``). Templates come with the
model file, so they run in Jinja's immutable sandbox: no attribute access to Python internals, no mutation of
the messages. The environment matches transformers' (``trim_blocks``, ``lstrip_blocks``, the ``tojson`` filter,
``raise_exception``, ``strftime_now``), so a template written for transformers renders the same text here.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CSDraftingError

TEMPLATE_KEY = "tokenizer.chat_template"


class ChatTemplateError(CSDraftingError):
    """A chat template could not be compiled, or refused to render the given messages."""


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template plus the special-token strings templates refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``); with
        ``add_generation_prompt`` it ends where the assistant's answer starts."""
        import jinja2

        try:
            return _compile(self.source).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except jinja2.TemplateError as exc:  # syntax errors, sandbox violations, raise_exception(...)
            raise ChatTemplateError(str(exc) or type(exc).__name__) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:  # bad data met inside a filter
            raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from None


def _raise_exception(message: str):
    """Templates call ``raise_exception("...")`` to reject a conversation (e.g. roles out of order)."""
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value, indent=None) -> str:
    # the JSON text is inserted as is: keep non-ASCII characters, as transformers does
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(format: str) -> str:
    """Today's date for templates that state it in the system prompt (Llama 3's do)."""
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


# -- reading a GGUF's metadata ---------------------------------------------------------------------
# A small reader of the GGUF header's key-value section, because gguf-py's GGUFReader parses every tensor
# record and builds one array per token (15 s for Qwen's 151,936-token vocabulary on this machine); this reads
# the keys in one pass over the first few MB (~0.2 s). Layout (little-endian): b"GGUF", u32 version,
# u64 tensor count, u64 key count, then per key: string key, u32 value type, value; a string is u64 length +
# UTF-8 bytes; an array is u32 element type, u64 count, elements.

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GgufHeader:
    def __init__(self, handle) -> None:
        self.handle = handle

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its metadata")
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        return self.handle.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type == _GGUF_ARRAY:
            element_type, count = self.unpack("I"), self.unpack("Q")
            return [self.value(element_type) for _ in range(count)]
        if value_type not in _GGUF_SCALARS:
            raise ValueError(f"unknown metadata value type {value_type}")
        return self.unpack(_GGUF_SCALARS[value_type])


def read_gguf_metadata(path: str | os.PathLike, keys: set[str]) -> dict:
    """The values of ``keys`` found in a GGUF file's metadata (absent keys are left out)."""
    try:
        with open(path, "rb") as raw:
            header = _GgufHeader(io.BufferedReader(raw, buffer_size=1 << 20))
            if header.handle.read(4) != b"GGUF":
                raise ValueError("not a GGUF file")
            header.unpack("I")  # version
            header.unpack("Q")  # tensor count
            found = {}
            for _ in range(header.unpack("Q")):
                key, value = header.string(), header.value(header.unpack("I"))
                if key in keys:
                    found[key] = value
            return found
    except (OSError, ValueError, struct.error) as exc:
        raise ChatTemplateError(f"cannot read the GGUF metadata of {path}: {exc}") from None


def read_gguf_chat_template(path: str | os.PathLike) -> ChatTemplate | None:
    """The chat template stored in a GGUF file, with its BOS/EOS token strings; None when it has none."""
    bos_key, eos_key, tokens_key = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.tokens"
    found = read_gguf_metadata(path, {TEMPLATE_KEY, bos_key, eos_key, tokens_key})
    source = found.get(TEMPLATE_KEY)
    if not isinstance(source, str) or not source:
        return None
    tokens = found.get(tokens_key) or []

    def token_text(key: str) -> str:
        token_id = found.get(key)
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else ""

    return ChatTemplate(source=source, bos_token=token_text(bos_key), eos_token=token_text(eos_key))


@functools.lru_cache(maxsize=8)
def _cached_gguf_template(path: str, mtime_ns: int, size: int) -> ChatTemplate | None:
    return read_gguf_chat_template(path)


def gguf_chat_template(tokenizer) -> ChatTemplate | None:
    """The chat template of the GGUF a tokenizer was read from (``tokenizer.path``, as llama.cpp tokenizers
    carry); None for other tokenizers and for a GGUF without a template. Read once per file version."""
    path = getattr(tokenizer, "path", None)
    if path is None or Path(path).suffix.lower() != ".gguf":
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _cached_gguf_template(str(path), stat.st_mtime_ns, stat.st_size)
