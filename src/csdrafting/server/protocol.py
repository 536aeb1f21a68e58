"""The OpenAI wire format: request validation, error bodies, response and stream-chunk bodies.

No web framework here: ``parse_*`` take the decoded JSON body and the Cascade and return a
``GenerationRequest`` or raise ``ApiError``, whose ``body()`` is OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``.

Validation is strict and happens before a request is queued: a field of the wrong type, a value
out of range, a parameter this server cannot honour or one it does not know is a 400 that names
the field. Silently ignoring e.g. ``logit_bias`` would return output the client did not ask for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import GenerationInputError
from ..stats import GenerationStats

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_LENGTH = 500  # characters; the stop-string scan per step grows with this length
MAX_SEED = 2**63 - 1
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant")
STATS_FIELD = "speculative_stats"  # the extra response field holding this request's GenerationStats

# Fields accepted and ignored: they describe the caller or storage, never the output.
_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}

# Fields this server cannot honour: accepted only at their neutral value, else a 400 with this reason.
_NO_LOGPROBS = "logprobs are not supported by csd serve"
_NO_TOOLS = "tool and function calling is not supported by csd serve"
_UNSUPPORTED = {
    "logprobs": (lambda v: v is None or v is False, _NO_LOGPROBS),
    "top_logprobs": (lambda v: v is None or (_is_int(v) and v == 0), _NO_LOGPROBS),
    "best_of": (lambda v: v is None or (_is_int(v) and v == 1), "best_of must be 1: one completion per request"),
    "echo": (lambda v: v is None or v is False, "echo is not supported by csd serve"),
    "suffix": (lambda v: v is None or v == "", "suffix (insertion) is not supported by csd serve"),
    "logit_bias": (
        lambda v: v is None or v == {},
        "logit_bias is not supported: it would change the target distribution the cascade reproduces",
    ),
    "presence_penalty": (
        lambda v: v is None or (_is_number(v) and v == 0),
        "presence_penalty must be 0 (penalties are not supported)",
    ),
    "frequency_penalty": (
        lambda v: v is None or (_is_number(v) and v == 0),
        "frequency_penalty must be 0 (penalties are not supported)",
    ),
    "tools": (lambda v: v is None or v == [], _NO_TOOLS),
    "tool_choice": (lambda v: v is None or v == "none", _NO_TOOLS),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), _NO_TOOLS),
    "functions": (lambda v: v is None or v == [], _NO_TOOLS),
    "function_call": (lambda v: v is None or v == "none", _NO_TOOLS),
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        'response_format other than {"type": "text"} is not supported by csd serve',
    ),
    "audio": (lambda v: v is None, "audio output is not supported by csd serve"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported by csd serve"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported by csd serve"),
    "web_search_options": (lambda v: v is None, "web search is not supported by csd serve"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported by csd serve"),
    "verbosity": (lambda v: v is None, "verbosity is not supported by csd serve"),
}

_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options"}
_EXTENSIONS = {"top_k", "ignore_eos"}  # not in OpenAI's API; vLLM accepts them too
_COMPLETION_FIELDS = _COMMON | _EXTENSIONS | {"prompt"}
_COMPLETION_UNSUPPORTED = {
    "logprobs",
    "best_of",
    "echo",
    "suffix",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
}
_CHAT_FIELDS = _COMMON | _EXTENSIONS | {"messages", "max_completion_tokens"}
_CHAT_UNSUPPORTED = set(_UNSUPPORTED) - {"best_of", "echo", "suffix"}


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
            400, f"the request body must be a JSON object, got a JSON {_json_type(body)}", code="invalid_json"
        )
    return body


def _json_type(value) -> str:
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


def _check_text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} contains invalid Unicode (a lone surrogate)", param=param) from None
    return value


def _check_fields(body: dict, known: set[str], unsupported: set[str]) -> None:
    for name, value in body.items():
        if name in unsupported:
            accepts, reason = _UNSUPPORTED[name]
            if not accepts(value):
                raise ApiError(400, reason, param=name, code="unsupported_parameter")
        elif name not in known and name not in _IGNORED:
            raise ApiError(400, f"unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")


def _check_model(body: dict, model_names: set[str]) -> str:
    if "model" not in body or body["model"] is None:
        raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    model = body["model"]
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got a JSON {_json_type(model)}", param="model")
    if model not in model_names:
        served = ", ".join(sorted(model_names))
        raise ApiError(
            404,
            f"the model {model[:200]!r} does not exist on this server; it serves: {served}",
            param="model",
            code="model_not_found",
        )
    return model


def _optional_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean, got a JSON {_json_type(value)}", param=name)
    return value


def _optional_number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise ApiError(400, f"{name} must be a number, got a JSON {_json_type(value)}", param=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{name} must be in {interval}, got {value}", param=name)
    return float(value)


def _optional_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise ApiError(400, f"{name} must be an integer, got a JSON {_json_type(value)}", param=name)
    return value


def _parse_sampling(body: dict) -> dict:
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1: csd serve returns one choice per request, got {n}", param="n")
    temperature = _optional_number(body, "temperature", 0.0, 2.0)
    top_p = _optional_number(body, "top_p", 0.0, 1.0, low_open=True)
    top_k = _optional_int(body, "top_k")
    if top_k is not None and top_k < -1:
        raise ApiError(400, f"top_k must be a positive integer, or -1 / 0 for no limit, got {top_k}", param="top_k")
    seed = _optional_int(body, "seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed must be an integer in [0, 2**63 - 1], got {seed}", param="seed")
    stream = _optional_bool(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, 'stream_options must be an object like {"include_usage": true}', param="stream_options")
        include_usage = _optional_bool(options, "include_usage")
    return {
        "temperature": 1.0 if temperature is None else temperature,  # OpenAI's default
        "top_p": top_p,
        "top_k": top_k if top_k is not None and top_k > 0 else None,
        "seed": seed,
        "stop": _parse_stop(body.get("stop")),
        "ignore_eos": _optional_bool(body, "ignore_eos"),
        "stream": stream,
        "include_usage": include_usage,
    }


def _parse_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or an array of strings", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}", param="stop")
    for s in stop:
        if len(s) > MAX_STOP_LENGTH:
            raise ApiError(
                400, f"each stop sequence is at most {MAX_STOP_LENGTH} characters, got {len(s)}", param="stop"
            )
        _check_text(s, "stop")
    return tuple(stop)


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
    if requested < 1:
        raise ApiError(400, f"{param} must be at least 1, got {requested}", param=param)
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


# -- /v1/completions -----------------------------------------------------------------------------


def parse_completion_request(body: dict, cascade, model_names: set[str]) -> GenerationRequest:
    _check_fields(body, _COMPLETION_FIELDS, _COMPLETION_UNSUPPORTED)
    model = _check_model(body, model_names)
    sampling = _parse_sampling(body)
    max_tokens = _optional_int(body, "max_tokens")
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "you must provide a prompt", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        prompt_ids = _encode(cascade, _check_text(prompt, "prompt"), "prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt_ids = _encode(cascade, prompt, "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, f"got {len(prompt)} prompts: csd serve takes one prompt per request", param="prompt")
    elif prompt == []:
        raise ApiError(400, "prompt is empty", param="prompt")
    else:
        raise ApiError(400, "prompt must be a string or an array of token ids", param="prompt")
    max_tokens = _resolve_max_tokens(
        max_tokens, len(prompt_ids), cascade.max_context, DEFAULT_COMPLETION_MAX_TOKENS, "max_tokens"
    )
    return GenerationRequest(kind="completion", model=model, prompt_ids=prompt_ids, max_tokens=max_tokens, **sampling)


# -- /v1/chat/completions ------------------------------------------------------------------------

_MESSAGE_KEYS = {"role", "content", "name"}
_MESSAGE_KEYS_IF_EMPTY = {"tool_calls", "function_call", "refusal", "annotations", "audio"}  # echoed back by clients


def parse_messages(messages) -> list[dict]:
    """Validate chat messages; returns ``[{"role", "content"}]`` with the content as one string."""
    if not isinstance(messages, list):
        raise ApiError(
            400, f"messages must be an array of message objects, got a JSON {_json_type(messages)}", param="messages"
        )
    if not messages:
        raise ApiError(400, "messages must contain at least one message", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        for key, value in message.items():
            if key in _MESSAGE_KEYS_IF_EMPTY and value:
                raise ApiError(
                    400, f"{where}.{key} is not supported by csd serve (no tool calling)", param=f"{where}.{key}"
                )
            if key not in _MESSAGE_KEYS and key not in _MESSAGE_KEYS_IF_EMPTY:
                raise ApiError(400, f"{where} has an unrecognized field {key!r}", param=f"{where}.{key}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            shown = role if isinstance(role, str) else f"a JSON {_json_type(role)}"
            raise ApiError(
                400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {shown!s:.100}", param=f"{where}.role"
            )
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, f"{where}.name must be a string", param=f"{where}.name")
        out.append({"role": role, "content": _message_content(message.get("content"), f"{where}.content")})
    return out


def _message_content(content, param: str) -> str:
    if isinstance(content, str):
        return _check_text(content, param)
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise ApiError(
                    400,
                    f'{param}[{j}] must be a text part {{"type": "text", "text": ...}}'
                    + (f"; {kind!s:.50} parts are not supported" if kind not in (None, "text") else ""),
                    param=f"{param}[{j}]",
                )
            texts.append(_check_text(part["text"], param))
        return "".join(texts)
    raise ApiError(
        400, f"{param} must be a string or an array of text parts, got a JSON {_json_type(content)}", param=param
    )


def chat_prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt text for chat ``messages`` (each ``{"role", "content"}`` with string content).

    With a chat template (``tokenizer.chat_template``) this is the template's rendering with the
    generation prompt added. Without one, the plain-text fallback: one ``"{role}: {content}"``
    line per message, then ``"assistant:"`` for the model to continue.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_prompt_ids(cascade, messages: list[dict]) -> list[int]:
    """Token ids of the chat prompt. A template renders its own special tokens, so none are added;
    the fallback text is encoded exactly as ``cascade.generate(text)`` encodes it."""
    tokenizer = cascade.tokenizer
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so it cannot serve chat completions", param="messages")
    try:
        text = chat_prompt_text(tokenizer, messages)
    except Exception as exc:  # jinja TemplateError and whatever a template raises on purpose
        raise ApiError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
    if getattr(tokenizer, "chat_template", None):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ApiError(400, "messages render to an empty prompt", param="messages")
        return ids
    return _encode(cascade, text, "messages")


def parse_chat_request(body: dict, cascade, model_names: set[str]) -> GenerationRequest:
    _check_fields(body, _CHAT_FIELDS, _CHAT_UNSUPPORTED)
    model = _check_model(body, model_names)
    sampling = _parse_sampling(body)
    max_tokens = _optional_int(body, "max_tokens")
    max_completion_tokens = _optional_int(body, "max_completion_tokens")
    param = "max_tokens"
    if max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != max_completion_tokens:
            raise ApiError(
                400, "max_tokens and max_completion_tokens differ: give one of them", param="max_completion_tokens"
            )
        max_tokens, param = max_completion_tokens, "max_completion_tokens"
    if "messages" not in body:
        raise ApiError(400, "you must provide messages", param="messages", code="missing_required_parameter")
    prompt_ids = chat_prompt_ids(cascade, parse_messages(body["messages"]))
    max_tokens = _resolve_max_tokens(max_tokens, len(prompt_ids), cascade.max_context, None, param)
    return GenerationRequest(kind="chat", model=model, prompt_ids=prompt_ids, max_tokens=max_tokens, **sampling)


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
