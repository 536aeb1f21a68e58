"""The OpenAI wire format: errors, the checks that need the served model, and response bodies.

Request bodies are pydantic models (``schema.py``), validated by FastAPI; ``validation_error``
turns pydantic's first error into OpenAI's error shape ``{"error": {"message", "type", "param",
"code"}}`` (``ApiError.body()``), with a message that names the field. ``completion_request`` and
``chat_request`` then check what depends on the served model (its name, the tokenizer, the context
length) and return a ``GenerationRequest``, or raise ``ApiError``. No web framework here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..chat_template import gguf_chat_template
from ..errors import GenerationInputError
from ..stats import GenerationStats
from .schema import ChatCompletionRequest, CompletionRequest, GenerationRequestBase, json_type

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
STATS_FIELD = "speculative_stats"  # the extra response field holding this request's GenerationStats


class ApiError(Exception):
    """An error response: HTTP status plus OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: what to run and how to answer."""

    kind: str  # "completion" or "chat"
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool

    def generation_options(self) -> dict:
        """Keyword arguments for ``Cascade.stream`` / ``Cascade.generate`` (after the prompt)."""
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "stop": list(self.stop),
        }


# -- the body ------------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict:
    """Request bytes -> the JSON object; anything else is a 400."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, NaN, integers too long to convert
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(
            400, f"the request body must be a JSON object, got a JSON {json_type(body)}", code="invalid_json"
        )
    return body


# -- pydantic's errors as OpenAI's ------------------------------------------------------------------

# pydantic error type -> what the field must be
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _param(loc: tuple) -> str | None:
    """A pydantic location after "body" -> OpenAI's param: ``messages[0].content``."""
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def validation_error(errors: list[dict]) -> ApiError:
    """The first of pydantic's errors (FastAPI's ``RequestValidationError.errors()``) as a 400."""
    error = errors[0]
    loc = tuple(error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"])
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    param = _param(loc)
    if kind in ("invalid_value", "unsupported_parameter"):
        param = (param or "body") + ctx.get("suffix", "")
        code = "unsupported_parameter" if kind == "unsupported_parameter" else None
        return ApiError(400, f"{param} {error['msg']}", param=param, code=code)
    if kind == "missing":
        message = f"you must provide a {param} parameter" if len(loc) == 1 else f"{param} is required"
        return ApiError(400, message, param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        if len(loc) == 1:
            message = f"unrecognized request argument supplied: {loc[0]}"
            return ApiError(400, message, param=param, code="unknown_parameter")
        return ApiError(400, f"{_param(loc[:-1])} has an unrecognized field {loc[-1]!r}", param=param)
    if kind in _EXPECTED:
        message = f"{param} must be {_EXPECTED[kind]}, got a JSON {json_type(value)}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))  # pydantic's ctx holds the one bound: {"ge": 0.0}
        shown = f"{bound:g}" if isinstance(bound, float) else bound
        message = f"{param} must be {_BOUNDS[kind]} {shown}, got {value}"
    elif kind == "too_short":
        message = f"{param} must hold at least {ctx['min_length']} item, got {ctx['actual_length']}"
    elif kind == "literal_error":
        message = f"{param} must be {ctx['expected']}, got {str(value)[:100]!r}"
    else:  # a type this server does not word itself: pydantic's message
        message = f"{param}: {error['msg']}"
    return ApiError(400, message, param=param)


# -- the checks that need the served model -----------------------------------------------------------


def _check_model(model: str, model_names: set[str]) -> None:
    if model not in model_names:
        served = ", ".join(sorted(model_names))
        raise ApiError(
            404,
            f"the model {model[:200]!r} does not exist on this server; it serves: {served}",
            param="model",
            code="model_not_found",
        )


def _sampling(body: GenerationRequestBase) -> dict:
    """The GenerationRequest fields every endpoint shares, with OpenAI's defaults."""
    options = body.stream_options
    stop = body.stop
    return {
        "model": body.model,
        "temperature": 1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        "top_p": body.top_p,
        "top_k": body.top_k if body.top_k is not None and body.top_k > 0 else None,
        "seed": body.seed,
        "stop": () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop)),
        "ignore_eos": bool(body.ignore_eos),
        "stream": bool(body.stream),
        "include_usage": bool(options is not None and options.include_usage),
    }


def _resolve_max_tokens(
    requested: int | None, num_prompt: int, max_context: int, default: int | None, param: str
) -> int:
    """The context must hold the prompt and at least one new token; ``requested`` must fit after it."""
    if num_prompt >= max_context:
        raise ApiError(
            400,
            f"the prompt has {num_prompt} tokens; this model's maximum context length is {max_context} tokens "
            "(prompt plus new tokens): shorten the prompt",
            param="messages" if param == "max_completion_tokens" else "prompt",
            code="context_length_exceeded",
        )
    room = max_context - num_prompt
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ApiError(
            400,
            f"{param} is {requested}, but the prompt has {num_prompt} tokens and this model's maximum context "
            f"length is {max_context} tokens: at most {room} new tokens fit",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _encode(cascade, prompt, param: str) -> list[int]:
    try:
        return cascade.encode(prompt)
    except GenerationInputError as exc:
        raise ApiError(400, str(exc), param=param) from None


def completion_request(body: CompletionRequest, cascade, model_names: set[str]) -> GenerationRequest:
    """A validated /v1/completions body -> what to run (tokenizes: may take a moment)."""
    _check_model(body.model, model_names)
    prompt_ids = _encode(cascade, body.prompt, "prompt")
    max_tokens = _resolve_max_tokens(
        body.max_tokens, len(prompt_ids), cascade.max_context, DEFAULT_COMPLETION_MAX_TOKENS, "max_tokens"
    )
    return GenerationRequest(kind="completion", prompt_ids=prompt_ids, max_tokens=max_tokens, **_sampling(body))


def chat_request(body: ChatCompletionRequest, cascade, model_names: set[str]) -> GenerationRequest:
    """A validated /v1/chat/completions body -> what to run (renders and tokenizes the prompt)."""
    _check_model(body.model, model_names)
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    prompt_ids = chat_prompt_ids(cascade, messages)
    max_tokens, param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    max_tokens = _resolve_max_tokens(max_tokens, len(prompt_ids), cascade.max_context, None, param)
    return GenerationRequest(kind="chat", prompt_ids=prompt_ids, max_tokens=max_tokens, **_sampling(body))


# -- chat prompts ----------------------------------------------------------------------------------


def chat_prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt text for chat ``messages`` (each ``{"role", "content"}`` with string content).

    With a chat template (``tokenizer.chat_template``, or a GGUF family's ``tokenizer.chat_template``
    metadata: ``chat_template.py``) this is the template's rendering with the generation prompt added. Without one, the plain-text fallback: one ``"{role}: {content}"``
    line per message, then ``"assistant:"`` for the model to continue.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    gguf_template = gguf_chat_template(tokenizer)  # a GGUF family's own template (metadata), if it has one
    if gguf_template is not None:
        return gguf_template.render(messages, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_prompt_ids(cascade, messages: list[dict]) -> list[int]:
    """Token ids of the chat prompt. A template renders its own special tokens, so none are added;
    the fallback text is encoded exactly as ``cascade.generate(text)`` encodes it."""
    tokenizer = cascade.tokenizer
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so it cannot serve chat completions", param="messages")
    try:
        templated = bool(getattr(tokenizer, "chat_template", None)) or gguf_chat_template(tokenizer) is not None
        text = chat_prompt_text(tokenizer, messages)
    except Exception as exc:  # jinja TemplateError and whatever a template raises on purpose
        raise ApiError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
    if templated:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ApiError(400, "messages render to an empty prompt", param="messages")
        return ids
    return _encode(cascade, text, "messages")


# -- responses -----------------------------------------------------------------------------------


def finish_reason(library_reason: str | None) -> str | None:
    """The library's eos / stop / length -> OpenAI's stop / length."""
    if library_reason is None:
        return None
    return "length" if library_reason == "length" else "stop"


def usage(stats: GenerationStats) -> dict:
    return {
        "prompt_tokens": stats.num_prompt_tokens,
        "completion_tokens": stats.num_new_tokens,
        "total_tokens": stats.num_prompt_tokens + stats.num_new_tokens,
    }


def response_body(request: GenerationRequest, request_id: str, created: int, text: str, stats: GenerationStats) -> dict:
    """The non-streamed response: one choice, usage, and this request's speculative statistics."""
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
        obj = "text_completion"
    choice["finish_reason"] = finish_reason(stats.finish_reason)
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": request.model,
        "choices": [choice],
        "usage": usage(stats),
        STATS_FIELD: stats.as_dict(),
    }


def chunk_body(
    request: GenerationRequest,
    request_id: str,
    created: int,
    text: str | None,
    level: str | None = None,
    stats: GenerationStats | None = None,
    role: bool = False,
) -> dict:
    """One streamed chunk. Text chunks name the ``level`` that drafted their tokens; the last
    chunk (``stats`` given) carries the finish reason, usage and the speculative statistics."""
    if request.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None}
        obj = "text_completion"
    choice["finish_reason"] = finish_reason(stats.finish_reason) if stats is not None else None
    if level is not None:
        choice["level"] = level
    body = {"id": request_id, "object": obj, "created": created, "model": request.model, "choices": [choice]}
    if stats is not None:
        body["usage"] = usage(stats)
        body[STATS_FIELD] = stats.as_dict()
    return body


def usage_chunk_body(request: GenerationRequest, request_id: str, created: int, stats: GenerationStats) -> dict:
    """The extra last chunk of ``stream_options: {"include_usage": true}``: no choices, only usage."""
    obj = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": request.model,
        "choices": [],
        "usage": usage(stats),
    }
