"""The OpenAI request bodies as pydantic models: FastAPI validates every generation request with
them before its handler runs, and ``/docs`` shows them.

Validation is strict, as OpenAI's is: no coercion (``"16"`` is not 16, ``1.0`` is not an integer,
``true`` is not 1), no unknown fields, and a parameter this server cannot honour is accepted only
at its neutral value, else refused with its reason: silently ignoring e.g. ``logit_bias`` would
return output the client did not ask for. The checks that need the served model (its name, the
tokenizer, the context length) run afterwards, in ``protocol.py``.

Failures raised here use two error types, which ``protocol.validation_error`` turns into OpenAI's
error body, both with a message that is a predicate completed by the field's name ("must be 1:
..."): ``invalid_value`` and ``unsupported_parameter``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_LENGTH = 500  # characters; the stop-string scan per step grows with this length
MAX_SEED = 2**63 - 1
CHAT_ROLES = ("system", "developer", "user", "assistant")


def invalid(predicate: str, suffix: str = "") -> PydanticCustomError:
    """A failed check. The message reads "<field><suffix> <predicate>" (suffix: e.g. "[2]", an
    item of the field). Braces in ``predicate`` are literal: only ``{suffix}`` is substituted."""
    return PydanticCustomError("invalid_value", predicate, {"suffix": suffix})


def json_type(value) -> str:
    """The JSON name of a decoded JSON value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to lone surrogates
        raise invalid("contains invalid Unicode (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _refused(accepts, predicate: str, neutral: str = "null", schema: Any = Any):
    """A field accepted only at its neutral value (``accepts(value)``) or null, else refused:
    "<field> <predicate>"."""

    def check(value):
        if value is not None and not accepts(value):
            raise PydanticCustomError("unsupported_parameter", predicate)
        return value

    description = f"Not supported by csd serve: accepted only as {neutral}."
    return Annotated[schema | None, BeforeValidator(check), Field(description=description)]


def _never(value) -> bool:
    return False


_NO_TOOLS = "is not supported: csd serve has no tool or function calling"
Logprobs = _refused(lambda v: v is False, "is not supported by csd serve", "false", bool | int)
TopLogprobs = _refused(lambda v: _is_int(v) and v == 0, "must be 0: logprobs are not supported by csd serve", "0", int)
BestOf = _refused(lambda v: _is_int(v) and v == 1, "must be 1: one completion per request", "1", int)
Echo = _refused(lambda v: v is False, "is not supported by csd serve", "false", bool)
Suffix = _refused(lambda v: v == "", "(insertion) is not supported by csd serve", '""', str)
LogitBias = _refused(
    lambda v: v == {},
    "is not supported: it would change the target distribution the cascade reproduces",
    "{}",
    dict[str, float],
)
Penalty = _refused(
    lambda v: _is_number(v) and v == 0, "must be 0: penalties are not supported by csd serve", "0", float
)
# Tool calling is refused whenever it is asked for, even as an empty list or "none": a client that
# sends tools expects a server that can call them.
Tools = _refused(_never, _NO_TOOLS, schema=list[dict[str, Any]])
ToolChoice = _refused(_never, _NO_TOOLS, schema=str | dict[str, Any])
ParallelToolCalls = _refused(_never, _NO_TOOLS, schema=bool)
ResponseFormat = _refused(
    lambda v: v == {"type": "text"},
    'other than {"type": "text"} is not supported by csd serve',
    '{"type": "text"}',
    dict[str, Any],
)
Modalities = _refused(
    lambda v: v == ["text"], 'other than ["text"] is not supported by csd serve', '["text"]', list[str]
)
Refused = _refused(_never, "is not supported by csd serve")
# message fields clients echo back from earlier answers: accepted only empty (no tool calling here)
Echoed = _refused(lambda v: not v, "is not supported by csd serve (no tool calling)", "empty")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="Send a last chunk with usage and no choices.")


class GenerationRequestBase(_Strict):
    """The fields shared by /v1/completions and /v1/chat/completions."""

    model: Text = Field(description="The served model id (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most (the context must hold them).")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy decoding; default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass; default 1 (off).")
    n: int | None = Field(None, description="Choices per request: only 1.")
    stream: bool | None = Field(None, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_LENGTH} characters."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Makes a sampled answer reproducible.")
    top_k: int | None = Field(None, ge=-1, description="Extension (as in vLLM): keep the k most likely tokens; -1 or 0: off.")  # fmt: skip
    ignore_eos: bool | None = Field(None, description="Extension (as in vLLM): generate past end-of-sequence.")
    # accepted and ignored: they describe the caller or storage, never the output
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise invalid(f"must be 1: csd serve returns one choice per request, got {n}")
        return n

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise invalid("is only allowed when stream is true")
        return options

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, stop):
        if stop is None:
            return stop
        strings = [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise invalid("must be a string or an array of strings")
        if len(strings) > MAX_STOP_SEQUENCES:
            raise invalid(f"takes at most {MAX_STOP_SEQUENCES} sequences, got {len(strings)}")
        for s in strings:
            if not s:
                raise invalid("must not contain an empty string: it would match before any text")
            if len(s) > MAX_STOP_LENGTH:
                raise invalid(f"sequences are at most {MAX_STOP_LENGTH} characters each, got {len(s)}")
            _valid_unicode(s)
        return stop


class CompletionRequest(GenerationRequestBase):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A string or an array of token ids (a batch of exactly one of either is accepted)."
    )
    logprobs: Logprobs = None
    best_of: BestOf = None
    echo: Echo = None
    suffix: Suffix = None
    logit_bias: LogitBias = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        """One prompt, as a string or token ids; a batch of one is unwrapped."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise invalid("is empty")
            return _valid_unicode(prompt)
        if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            return prompt
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise invalid(f"holds {len(prompt)} prompts: csd serve takes one prompt per request")
        if prompt == []:
            raise invalid("is empty")
        raise invalid(f"must be a string or an array of token ids, got a JSON {json_type(prompt)}")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="A string or text parts.")
    name: Text | None = None
    tool_calls: Echoed = None
    function_call: Echoed = None
    refusal: Echoed = None
    annotations: Echoed = None
    audio: Echoed = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role):
        if role not in CHAT_ROLES:
            shown = role if isinstance(role, str) else f"a JSON {json_type(role)}"
            raise invalid(f"must be one of {', '.join(CHAT_ROLES)}, got {shown!s:.100}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        if isinstance(content, str):
            return _valid_unicode(content)
        if not isinstance(content, list):
            raise invalid(f"must be a string or an array of text parts, got a JSON {json_type(content)}")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                unsupported = f"; {kind!s:.50} parts are not supported" if kind not in (None, "text") else ""
                raise invalid('must be a text part {"type": "text", "text": ...}' + unsupported, suffix=f"[{j}]")
            _valid_unicode(part["text"])
        return content

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequestBase):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="The same as max_tokens (give one or both equal).")  # fmt: skip
    logprobs: Logprobs = None
    top_logprobs: TopLogprobs = None
    logit_bias: LogitBias = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    tools: Tools = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: ParallelToolCalls = None
    functions: Tools = None
    function_call: ToolChoice = None
    response_format: ResponseFormat = None
    modalities: Modalities = None
    audio: Refused = None
    prediction: Refused = None
    web_search_options: Refused = None
    reasoning_effort: Refused = None
    verbosity: Refused = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _agrees_with_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if value is not None and max_tokens is not None and value != max_tokens:
            raise invalid("and max_tokens differ: give one of them")
        return value


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every error this server sends."""

    error: ErrorObject
