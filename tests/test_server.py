"""``csd serve`` against the real ``openai`` client and raw HTTP, on the embedded pycode models.

Servers run in a background thread on 127.0.0.1 (a free port) and are stopped by their fixture;
every request has a timeout. Greedy outputs are compared token for token (as text) with the
library's own ``Cascade.generate``, computed before any server starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from csdrafting.cli import build_parser, cascade_from_args, main  # noqa: E402
from csdrafting.server.app import create_app  # noqa: E402
from csdrafting.server.cli import bind_socket  # noqa: E402
from csdrafting.server.protocol import STATS_FIELD, ApiError, chat_prompt_ids, chat_prompt_text  # noqa: E402
from server_fixtures import ServerSettings  # noqa: E402
from server_helpers import (  # noqa: E402
    MODEL,
    TIMEOUT,
    ServerThread,
    http_client,
    make_client,
    metric,
    wait_until,
)

MAX_TOKENS = 12
LONG = 1800  # new tokens no test waits for: a request this long is only ever cancelled or timed out
PROMPTS = ["def parse_args(", "class Config:\n    def __init__(self", "import os\n\n\ndef read_lines(path):"]
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "seed": 1234}
STOP = "\n"


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings({"max_queue": 8, "request_timeout": 60})


@pytest.fixture(scope="module")
def reference(server_cascade):
    """The library's outputs, computed before the module's server shares the cascade (the
    embedded one with its K-matrix fixed: test_embedded_default_as_csd_serve_runs_it runs the
    adaptive one)."""
    greedy = {p: server_cascade.generate(p, max_new_tokens=MAX_TOKENS) for p in PROMPTS}
    chat_text = chat_prompt_text(server_cascade.tokenizer, CHAT)
    return {
        "greedy": greedy,
        "prompt_ids": {p: server_cascade.encode(p) for p in PROMPTS},
        "chat": server_cascade.generate(chat_text, max_new_tokens=MAX_TOKENS),
        "chat_prompt_ids": server_cascade.encode(chat_text),
        "sampled": server_cascade.generate(PROMPTS[0], max_new_tokens=MAX_TOKENS, **SAMPLED),
        "stop": server_cascade.generate(PROMPTS[2], max_new_tokens=MAX_TOKENS, stop=[STOP]),
    }


def idle(client: httpx.Client) -> bool:
    return (
        metric(client, "csd_requests_running", model=MODEL) == 0 and metric(client, "csd_queue_depth", model=MODEL) == 0
    )


def assert_greedy_completion(client, reference, prompt: str) -> None:
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].text == reference["greedy"][prompt].text


# -- information endpoints -------------------------------------------------------------------------


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


# -- completions and chat, equal to the library --------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_equals_library(client, reference, prompt):
    expected = reference["greedy"][prompt]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert response.usage.prompt_tokens == len(reference["prompt_ids"][prompt])
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    stats = getattr(response, STATS_FIELD)
    assert stats["num_new_tokens"] == len(expected.token_ids)
    assert [level["name"] for level in stats["levels"]] == [level.name for level in expected.stats.levels]
    assert (
        stats["num_target_steps"] == expected.stats.num_target_steps
    )  # greedy: the same steps, not just the same text


def test_completion_stream_equals_library(client, reference):
    prompt = PROMPTS[1]
    expected = reference["greedy"][prompt]
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    levels = {level.name for level in expected.stats.levels}
    assert {c.choices[0].level for c in chunks if c.choices[0].text} <= levels  # which level drafted each piece
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == len(expected.token_ids)
    assert getattr(last, STATS_FIELD)["num_new_tokens"] == len(expected.token_ids)


def test_prompt_as_token_ids(client, reference):
    prompt = PROMPTS[0]
    response = client.completions.create(
        model=MODEL, prompt=reference["prompt_ids"][prompt], max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].text == reference["greedy"][prompt].text


def test_chat_equals_library_on_the_fallback_prompt(client, reference):
    expected = reference["chat"]
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(reference["chat_prompt_ids"])
    assert getattr(response, STATS_FIELD)["num_new_tokens"] == len(expected.token_ids)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-2].choices[0].finish_reason is not None and getattr(chunks[-2], STATS_FIELD)


def test_chat_content_parts_and_max_completion_tokens(client, reference):
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]
    response = client.chat.completions.create(
        model=MODEL, messages=parts, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].message.content == reference["chat"].text


class TemplatedTokenizer:
    """A tokenizer with a chat template: the template renders the prompt, special tokens included."""

    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"

    def __init__(self) -> None:
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        if messages[0]["role"] != "user":
            raise ValueError("conversations must start with a user message")
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"

    def __call__(self, text, add_special_tokens=True):
        self.calls.append((text, add_special_tokens))
        return {"input_ids": [ord(ch) for ch in text]}


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tokenizer = TemplatedTokenizer()
    fake = type("FakeCascade", (), {"tokenizer": tokenizer})()
    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt_text(tokenizer, messages) == "<|user|>hi<|assistant|>"
    assert chat_prompt_ids(fake, messages) == [ord(ch) for ch in "<|user|>hi<|assistant|>"]
    assert tokenizer.calls == [("<|user|>hi<|assistant|>", False)]  # the template has its own special tokens
    with pytest.raises(ApiError, match="chat template rejected") as rejected:
        chat_prompt_ids(fake, [{"role": "system", "content": "x"}])
    assert rejected.value.status == 400


def test_seeded_sampling_equals_library(client, reference):
    texts = [
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, **SAMPLED).choices[0].text
        for _ in range(2)
    ]
    assert texts == [reference["sampled"].text] * 2


def test_stop_string(client, reference):
    expected = reference["stop"]
    assert expected.finish_reason == "stop", "the reference prompt must reach the stop string"
    response = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, stop=[STOP]
    )
    assert response.choices[0].text == expected.text and response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, stop=STOP, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_embedded_default_as_csd_serve_runs_it(reference):
    """``csd serve`` with no flags: the embedded family, automatic (adaptive) schedule. Greedy text
    does not depend on the schedule, so it equals the fixed-schedule reference on every request."""
    default = cascade_from_args(build_parser().parse_args(["serve"]))
    with ServerThread(create_app(default, MODEL)) as url, make_client(url) as c:
        for _ in range(2):
            for prompt in PROMPTS:
                assert_greedy_completion(c, reference, prompt)
        streamed = c.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in streamed) == reference["greedy"][PROMPTS[0]].text


def test_concurrent_clients_get_the_library_output(server, reference):
    def run(i: int) -> list[str]:
        with make_client(server.url) as c:
            return [
                c.completions.create(
                    model=MODEL, prompt=PROMPTS[(i + j) % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0
                )
                .choices[0]
                .text
                for j in range(2)
            ]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    for i, texts in enumerate(results):
        assert texts == [reference["greedy"][PROMPTS[(i + j) % len(PROMPTS)]].text for j in range(2)]


# -- malformed and hostile requests -----------------------------------------------------------------


def _body(**fields) -> dict:
    return {"model": MODEL, "prompt": "def f(", "max_tokens": 4, "temperature": 0, **fields}


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0, **fields}


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


COMPLETIONS, CHAT_PATH = "/v1/completions", "/v1/chat/completions"
# (kind, method, path, body: bytes or JSON-able, expected status, expected error param or None)
HOSTILE = [
    ("invalid JSON", "POST", COMPLETIONS, b'{"model": ', 400, None),
    ("empty body", "POST", COMPLETIONS, b"", 400, None),
    ("JSON array body", "POST", COMPLETIONS, b"[1, 2]", 400, None),
    ("JSON string body", "POST", COMPLETIONS, b'"hello"', 400, None),
    ("invalid UTF-8", "POST", COMPLETIONS, b'{"model": "\xff\xfe"}', 400, None),
    (
        "NaN literal",
        "POST",
        COMPLETIONS,
        json.dumps(_body()).replace('"temperature": 0', '"temperature": NaN').encode(),
        400,
        None,
    ),
    ("nesting bomb", "POST", COMPLETIONS, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    (
        "5000-digit integer",
        "POST",
        COMPLETIONS,
        json.dumps(_body()).replace('"max_tokens": 4', '"max_tokens": ' + "9" * 5000).encode(),
        400,
        None,
    ),
    ("body over 1 MiB", "POST", COMPLETIONS, _body(prompt="x" * (1 << 20)), 413, None),
    ("missing model", "POST", COMPLETIONS, _without(_body(), "model"), 400, "model"),
    ("model not a string", "POST", COMPLETIONS, _body(model=123), 400, "model"),
    ("unknown model", "POST", COMPLETIONS, _body(model="gpt-4o"), 404, "model"),
    ("missing prompt", "POST", COMPLETIONS, _without(_body(), "prompt"), 400, "prompt"),
    ("prompt is an object", "POST", COMPLETIONS, _body(prompt={"text": "x"}), 400, "prompt"),
    ("empty prompt", "POST", COMPLETIONS, _body(prompt=""), 400, "prompt"),
    ("batch of prompts", "POST", COMPLETIONS, _body(prompt=["a", "b"]), 400, "prompt"),
    ("token id outside the vocabulary", "POST", COMPLETIONS, _body(prompt=[1, 99_999_999]), 400, "prompt"),
    ("lone surrogate in prompt", "POST", COMPLETIONS, b'{"model": "pycode-22m", "prompt": "\\ud800"}', 400, "prompt"),
    ("prompt longer than the context", "POST", COMPLETIONS, _body(prompt=" x" * 3000), 400, "prompt"),
    ("max_tokens 0", "POST", COMPLETIONS, _body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "POST", COMPLETIONS, _body(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens beyond the context", "POST", COMPLETIONS, _body(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens a string", "POST", COMPLETIONS, _body(max_tokens="16"), 400, "max_tokens"),
    ("max_tokens a float", "POST", COMPLETIONS, _body(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens a boolean", "POST", COMPLETIONS, _body(max_tokens=True), 400, "max_tokens"),
    ("temperature negative", "POST", COMPLETIONS, _body(temperature=-1), 400, "temperature"),
    ("temperature above 2", "POST", COMPLETIONS, _body(temperature=3), 400, "temperature"),
    ("temperature a string", "POST", COMPLETIONS, _body(temperature="hot"), 400, "temperature"),
    ("top_p 0", "POST", COMPLETIONS, _body(top_p=0), 400, "top_p"),
    ("top_p above 1", "POST", COMPLETIONS, _body(top_p=1.5), 400, "top_p"),
    ("seed negative", "POST", COMPLETIONS, _body(seed=-1), 400, "seed"),
    ("seed a string", "POST", COMPLETIONS, _body(seed="x"), 400, "seed"),
    ("n = 2", "POST", COMPLETIONS, _body(n=2), 400, "n"),
    ("logprobs", "POST", COMPLETIONS, _body(logprobs=5), 400, "logprobs"),
    ("best_of", "POST", COMPLETIONS, _body(best_of=3), 400, "best_of"),
    ("echo", "POST", COMPLETIONS, _body(echo=True), 400, "echo"),
    ("suffix", "POST", COMPLETIONS, _body(suffix="return x"), 400, "suffix"),
    ("logit_bias", "POST", COMPLETIONS, _body(logit_bias={"50": 100}), 400, "logit_bias"),
    ("presence_penalty", "POST", COMPLETIONS, _body(presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency_penalty", "POST", COMPLETIONS, _body(frequency_penalty=1), 400, "frequency_penalty"),
    ("stop a number", "POST", COMPLETIONS, _body(stop=42), 400, "stop"),
    ("stop with 5 strings", "POST", COMPLETIONS, _body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop string too long", "POST", COMPLETIONS, _body(stop="y" * 10_000), 400, "stop"),
    ("stop an empty string", "POST", COMPLETIONS, _body(stop=""), 400, "stop"),
    ("stop with an empty string", "POST", COMPLETIONS, _body(stop=["\n", ""]), 400, "stop"),
    ("chat: stop an empty string", "POST", CHAT_PATH, _chat(stop=[""]), 400, "stop"),
    ("stream not a boolean", "POST", COMPLETIONS, _body(stream="yes"), 400, "stream"),
    (
        "stream_options without stream",
        "POST",
        COMPLETIONS,
        _body(stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
    ("unknown parameter", "POST", COMPLETIONS, _body(frobnicate=1), 400, "frobnicate"),
    ("chat: missing messages", "POST", CHAT_PATH, _without(_chat(), "messages"), 400, "messages"),
    ("chat: messages not an array", "POST", CHAT_PATH, _chat(messages="hello"), 400, "messages"),
    ("chat: no messages", "POST", CHAT_PATH, _chat(messages=[]), 400, "messages"),
    (
        "chat: unknown role",
        "POST",
        CHAT_PATH,
        _chat(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "messages[0].role",
    ),
    (
        "chat: content a number",
        "POST",
        CHAT_PATH,
        _chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
    ),
    (
        "chat: image part",
        "POST",
        CHAT_PATH,
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0]",
    ),
    (
        "chat: tool message",
        "POST",
        CHAT_PATH,
        _chat(messages=[{"role": "tool", "content": "1", "tool_call_id": "a"}]),
        400,
        None,
    ),
    ("chat: tools", "POST", CHAT_PATH, _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("chat: functions", "POST", CHAT_PATH, _chat(functions=[{"name": "f"}]), 400, "functions"),
    ("chat: empty tools", "POST", CHAT_PATH, _chat(tools=[]), 400, "tools"),
    ("chat: tool_choice none", "POST", CHAT_PATH, _chat(tool_choice="none"), 400, "tool_choice"),
    ("chat: empty functions", "POST", CHAT_PATH, _chat(functions=[]), 400, "functions"),
    ("chat: function_call none", "POST", CHAT_PATH, _chat(function_call="none"), 400, "function_call"),
    ("chat: parallel_tool_calls", "POST", CHAT_PATH, _chat(parallel_tool_calls=False), 400, "parallel_tool_calls"),
    (
        "chat: echoed tool_calls",
        "POST",
        CHAT_PATH,
        _chat(messages=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "a"}]}]),
        400,
        "messages[0].tool_calls",
    ),
    (
        "chat: unknown message field",
        "POST",
        CHAT_PATH,
        _chat(messages=[{"role": "user", "content": "x", "mood": "ok"}]),
        400,
        "messages[0].mood",
    ),
    (
        "chat: message without content",
        "POST",
        CHAT_PATH,
        _chat(messages=[{"role": "user"}]),
        400,
        "messages[0].content",
    ),
    ("chat: messages an object", "POST", CHAT_PATH, _chat(messages={"role": "user"}), 400, "messages"),
    ("chat: audio", "POST", CHAT_PATH, _chat(audio={"voice": "x"}), 400, "audio"),
    (
        "chat: stream_options not an object",
        "POST",
        CHAT_PATH,
        _chat(stream=True, stream_options="yes"),
        400,
        "stream_options",
    ),
    (
        "chat: stream_options unknown field",
        "POST",
        CHAT_PATH,
        _chat(stream=True, stream_options={"x": 1}),
        400,
        "stream_options.x",
    ),
    ("chat: JSON mode", "POST", CHAT_PATH, _chat(response_format={"type": "json_object"}), 400, "response_format"),
    (
        "chat: conflicting max tokens",
        "POST",
        CHAT_PATH,
        _chat(max_tokens=4, max_completion_tokens=5),
        400,
        "max_completion_tokens",
    ),
    ("chat: a completions field", "POST", CHAT_PATH, _chat(prompt="x"), 400, "prompt"),
    ("GET on a POST endpoint", "GET", COMPLETIONS, None, 405, None),
    ("POST on a GET endpoint", "POST", "/v1/models", _body(), 405, None),
    ("unknown endpoint", "POST", "/v1/embeddings", _body(), 404, None),
    ("unknown model card", "GET", "/v1/models/gpt-4o", None, 404, "model"),
]


def send_hostile(http, method: str, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return http.request(method, path, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("kind,method,path,body,status,param", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_request_gets_a_clear_4xx(http, kind, method, path, body, status, param):
    response = send_hostile(http, method, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and 10 <= len(error["message"]) <= 500
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_openai_client_surfaces_the_errors(client):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=MODEL, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4o", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)


def test_server_is_healthy_and_correct_after_hostile_requests(client, http, reference):
    assert len(HOSTILE) >= 20
    for _, method, path, body, status, _ in HOSTILE:  # sent here too: this test runs alone as well
        assert send_hostile(http, method, path, body).status_code == status
    assert http.get("/health").json()["status"] == "ok"
    for prompt in PROMPTS:
        assert_greedy_completion(client, reference, prompt)
    assert metric(http, "csd_requests_total", model=MODEL, outcome="error") == 0


# -- disconnects, the queue, timeouts ------------------------------------------------------------------


def _long(client, **extra):
    return client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=LONG,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
        **extra,
    )


def test_disconnect_mid_stream_cancels_the_generation(client, http, reference):
    cancelled = metric(http, "csd_requests_total", model=MODEL, outcome="cancelled")
    tokens = metric(http, "csd_generation_tokens_total", model=MODEL)
    stream = _long(client)
    pieces = [chunk.choices[0].text for chunk, _ in zip(stream, range(3))]
    assert "".join(pieces)
    stream.close()  # the client goes away after 3 chunks of a generation that would take many seconds
    wait_until(lambda: idle(http), seconds=10)
    assert metric(http, "csd_requests_total", model=MODEL, outcome="cancelled") == cancelled + 1
    assert metric(http, "csd_generation_tokens_total", model=MODEL) == tokens  # it never completed
    assert_greedy_completion(client, reference, PROMPTS[0])  # and the next request is unaffected


def test_disconnect_while_waiting_for_a_plain_response(server, http, client, reference):
    cancelled = metric(http, "csd_requests_total", model=MODEL, outcome="cancelled")
    body = _body(prompt=PROMPTS[1], max_tokens=LONG, ignore_eos=True)
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(TIMEOUT, read=1.5), trust_env=False) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post(COMPLETIONS, json=body)
    wait_until(lambda: idle(http), seconds=10)
    assert metric(http, "csd_requests_total", model=MODEL, outcome="cancelled") == cancelled + 1
    assert_greedy_completion(client, reference, PROMPTS[1])


def test_full_queue_gets_503_with_retry_after(server_cascade, reference):
    with ServerThread(create_app(server_cascade, MODEL, max_queue=1, request_timeout=60)) as url, make_client(url) as c:
        with http_client(url) as h:
            running = _long(c)
            next(iter(running))  # generating now
            waiting = _long(c)  # accepted: headers come back while it waits
            wait_until(lambda: metric(h, "csd_queue_depth", model=MODEL) == 1)
            with pytest.raises(openai.InternalServerError) as refused:
                c.completions.create(model=MODEL, prompt="x", max_tokens=4)
            assert refused.value.status_code == 503
            assert int(refused.value.response.headers["retry-after"]) >= 1
            assert refused.value.body["code"] == "queue_full" and "busy" in refused.value.message
            assert metric(h, "csd_queue_full_total", model=MODEL) == 1
            assert metric(h, "csd_requests_total", model=MODEL, outcome="rejected") == 1
            waiting.close()
            running.close()
            wait_until(lambda: idle(h))
            assert_greedy_completion(c, reference, PROMPTS[2])


def test_request_timeout(server_cascade, reference):
    with (
        ServerThread(create_app(server_cascade, MODEL, max_queue=4, request_timeout=3.0)) as url,
        make_client(url) as c,
    ):
        with http_client(url) as h:
            with pytest.raises(openai.APIStatusError) as timed_out:
                c.completions.create(
                    model=MODEL, prompt=PROMPTS[0], max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True}
                )
            assert timed_out.value.status_code == 504 and "timeout" in timed_out.value.message
            with pytest.raises(openai.APIError, match="timeout"):
                for _ in _long(c):
                    pass
            wait_until(lambda: idle(h))
            assert metric(h, "csd_requests_total", model=MODEL, outcome="timeout") == 2
            assert_greedy_completion(c, reference, PROMPTS[1])


# -- metrics -----------------------------------------------------------------------------------------------


def level_reviews(stats) -> dict[str, int]:
    return {level.name: level.review.num_reviews for level in stats.levels if level.review is not None}


def counters(http: httpx.Client, levels) -> dict[str, float]:
    """The counters test_metrics watches: missing ones (nothing counted yet) read as 0."""
    values = {
        "tokens": metric(http, "csd_generation_tokens_total", 0, model=MODEL),
        "target steps": metric(http, "csd_target_steps_total", 0, model=MODEL),
        "400s": metric(http, "csd_http_requests_total", 0, method="POST", endpoint=COMPLETIONS, status="400"),
    }
    for level in levels:
        values[f"{level} reviews"] = metric(http, "csd_level_reviews_total", 0, model=MODEL, level=level)
    return values


def test_metrics(client, http, reference):
    """The counters move by exactly what this test's own requests did (one greedy completion,
    whose stats are the library's, and one 400), whatever ran before it."""
    expected = reference["greedy"][PROMPTS[0]].stats
    reviews = level_reviews(expected)
    assert reviews.get("pycode-5m", 0) > 0, "the reference generation must exercise a drafter's review"
    before = counters(http, reviews)
    assert_greedy_completion(client, reference, PROMPTS[0])
    assert http.post(COMPLETIONS, json=_body(n=2)).status_code == 400
    after = counters(http, reviews)
    moved = {
        "tokens": expected.num_new_tokens,
        "target steps": expected.num_target_steps,
        "400s": 1,
        **{f"{level} reviews": count for level, count in reviews.items()},
    }
    assert {name: after[name] - before[name] for name in after} == moved

    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "csd_http_requests_total",
        "csd_requests_total",
        "csd_generation_tokens_total",
        "csd_tokens_per_second",
        "csd_queue_depth",
        "csd_level_acceptance_rate",
        "csd_level_mean_acceptance_length",
    ):
        assert f"# TYPE {name} " in response.text
    assert metric(http, "csd_tokens_per_second", model=MODEL) > 0
    rate = metric(http, "csd_level_acceptance_rate", model=MODEL, level=MODEL)
    length = metric(http, "csd_level_mean_acceptance_length", model=MODEL, level=MODEL)
    assert 0 < rate <= 1 and length >= 1


# -- the command ---------------------------------------------------------------------------------------------


def test_serve_is_a_registered_subcommand(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    flags = ("--host", "--port", "--model-name", "--max-queue", "--timeout", "--body-timeout", "--allowed-host")
    for flag in (*flags, "--k-matrix", "--drafter"):
        assert flag in out
    assert "127.0.0.1" in out


def test_serve_user_errors_exit_2(capsys):
    taken = bind_socket("127.0.0.1", 0)
    taken.listen()
    try:
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen" in capsys.readouterr().err
    finally:
        taken.close()
    assert main(["serve", "--max-queue", "-1"]) == 2
    assert main(["serve", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err
    assert main(["serve", "--body-timeout", "-1"]) == 2
    assert "--body-timeout" in capsys.readouterr().err


def test_cli_imports_without_fastapi():
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "from csdrafting.cli import build_parser, main\n"
        "build_parser().parse_args(['serve', '--port', '0'])\n"
        "raise SystemExit(main(['serve', '--port', '0']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs fastapi, uvicorn" in result.stderr
