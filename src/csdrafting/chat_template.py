"""A GGUF's own chat template, rendered the way transformers renders a tokenizer's.

An instruct model is trained on prompts in its chat format (Qwen: ``<|im_start|>user ... <|im_end|>``); a GGUF
carries that format as a Jinja template in its metadata (``tokenizer.chat_template``). Templates come with the
model file, so they run in Jinja's immutable sandbox: no attribute access to Python internals, no mutation of
the messages. The environment matches transformers' (``trim_blocks``, ``lstrip_blocks``, the ``tojson`` filter,
``raise_exception``), so a template written for transformers renders the same text here.
"""

from __future__ import annotations

import functools
import json
import os
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


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


# -- reading a GGUF's metadata ---------------------------------------------------------------------


def read_gguf_chat_template(path: str | os.PathLike) -> ChatTemplate | None:
    """The chat template stored in a GGUF file, with its BOS/EOS token strings; None when it has none."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except (OSError, ValueError) as exc:
        raise ChatTemplateError(f"cannot read the GGUF metadata of {path}: {exc}") from None
    source = _string_field(reader, TEMPLATE_KEY)
    if not source:
        return None
    return ChatTemplate(
        source=source,
        bos_token=_token_text(reader, "tokenizer.ggml.bos_token_id"),
        eos_token=_token_text(reader, "tokenizer.ggml.eos_token_id"),
    )


def _string_field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _token_text(reader, id_key: str) -> str:
    """The text of the token whose id is stored under ``id_key``; "" when either is missing."""
    id_field = reader.fields.get(id_key)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if id_field is None or tokens is None or not id_field.data:
        return ""
    token_id = int(id_field.parts[id_field.data[0]][0])
    if not 0 <= token_id < len(tokens.data):
        return ""
    return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")


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
