"""``csd bench`` on a GGUF-only family (issue #18): the target and drafter are .gguf files with no HF folder,
workload records set each prompt's length and stop and are rendered with the target's chat template, and
llama.cpp's own llama-server runs as a peer when it is built. Tiny models, a few tokens, no timing assertions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from csdrafting.bench.llama_server_peer import LLAMA_CPP_PYTHON_VERSION, proc_peak_rss, server_available
from csdrafting.bench.workload import encode_prompt, prompt_text, record_fixed_length, record_max_new_tokens
from csdrafting.cli import main
from csdrafting.errors import ConfigError
from test_chat_template import CHATML, GgufTokenizer, write_gguf

# conftest.py points XDG_CACHE_HOME at a fresh folder: look for the built server in the user's own cache
BUILT_SERVER = Path.home() / ".cache" / "csdrafting" / "llama-server" / LLAMA_CPP_PYTHON_VERSION / "llama-server"
USER_ASKS = [{"role": "user", "content": "def f(): pass"}]


def test_messages_render_with_the_gguf_template_and_fall_back_to_text(tmp_path):
    record = {"id": "chat-x", "text": "plain: def f(): pass", "messages": USER_ASKS}
    templated = GgufTokenizer(write_gguf(tmp_path / "t.gguf", CHATML))
    text, add_special = prompt_text(record, templated)
    assert text.endswith("<|im_start|>user\ndef f(): pass<|im_end|>\n<|im_start|>assistant\n") and add_special
    assert encode_prompt(record, templated) == list(text.encode())
    plain = GgufTokenizer(write_gguf(tmp_path / "p.gguf", None))
    assert prompt_text(record, plain) == ("plain: def f(): pass", True)
    # a template writing the BOS itself: the tokenizer must not add a second one
    with_bos = GgufTokenizer(write_gguf(tmp_path / "b.gguf", "{{ bos_token }}" + CHATML))
    assert prompt_text(record, with_bos)[1] is False
    assert prompt_text({"id": "c", "text": "x = 1"}, templated) == ("x = 1", True)


def test_record_length_and_stop_override_the_suite():
    assert record_max_new_tokens({"id": "a"}, 128) == 128
    assert record_max_new_tokens({"id": "a", "max_new_tokens": 7}, 128) == 7
    assert record_fixed_length({"id": "a"}, True) is True
    assert record_fixed_length({"id": "a", "ignore_eos": False}, True) is False
    with pytest.raises(ConfigError, match="max_new_tokens"):
        record_max_new_tokens({"id": "a", "max_new_tokens": 0}, 128)
    with pytest.raises(ConfigError, match="ignore_eos"):
        record_fixed_length({"id": "a", "ignore_eos": "yes"}, True)


@pytest.fixture
def gguf_family(pycode_gguf, tmp_path):
    """The pycode-1m GGUF as the target and, under another name, as the drafter (always agrees); two workload
    records: a fixed-length completion and a chat request (the GGUF has no template: plain text)."""
    drafter = tmp_path / "drafter-1m.gguf"
    os.symlink(pycode_gguf, drafter)
    prompts = tmp_path / "workload.jsonl"
    records = [
        {"id": "completion-a", "text": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n",
         "max_new_tokens": 6, "ignore_eos": True},
        {"id": "chat-b", "text": "What does os.listdir return?", "messages": [
            {"role": "user", "content": "What does os.listdir return?"}], "max_new_tokens": 5, "ignore_eos": False},
    ]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"target": str(pycode_gguf), "drafter": str(drafter), "prompts": str(prompts)}


def _bench(family, tmp_path, only: str) -> list[dict]:
    results = tmp_path / "rows.jsonl"
    argv = ["bench", "--target", family["target"], "--drafter", family["drafter"], "--suite", "real-chat",
            "--prompts", family["prompts"], "--only", only, "--no-progress", "--output", str(results),
            "--report", str(tmp_path / "report")]  # fmt: skip
    assert main(argv) == 0
    return [json.loads(line) for line in results.read_text().splitlines()]


def test_bench_runs_a_gguf_family_with_workload_records(gguf_family, tmp_path):
    rows = _bench(gguf_family, tmp_path, "llama-plain,llama-prompt-lookup,csd-plain,csd-mag,csd-full")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods == ["llama-plain", "llama-prompt-lookup", "csd-plain@llama.cpp", "csd-mag@llama.cpp",
                       "csd-full@llama.cpp"]  # fmt: skip
    by = {(r["method"], r["prompt_id"]): r for r in rows}
    for row in rows:
        assert row["backend"] == "llama.cpp" and row["baseline"] == "llama-plain"
        assert row["matches_baseline"] is True, (row["method"], row["prompt_id"], row["first_mismatch"])
        assert row["memory"]["peak_bytes"] > 0
        if row["prompt_id"] == "completion-a":  # the record: 6 tokens, EOS ignored
            assert (row["max_new_tokens"], row["stop"], row["num_new_tokens"]) == (6, "fixed", 6)
        else:  # the record: at most 5 tokens, stopping at the end of generation
            assert (row["max_new_tokens"], row["stop"]) == (5, "natural") and row["num_new_tokens"] <= 5
    full = by[("csd-full@llama.cpp", "completion-a")]
    assert full["num_forwards"]["drafter-1m.gguf"] > 0 and full["acceptance_rate"] == 1.0  # a copy always agrees
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.skipif(not server_available(BUILT_SERVER), reason="llama-server not built (scripts/build_llama_server.sh)")
def test_llama_server_peers_run_in_the_same_bench(gguf_family, tmp_path, monkeypatch):
    monkeypatch.setenv("CSDRAFTING_LLAMA_SERVER", str(BUILT_SERVER))
    rows = _bench(gguf_family, tmp_path, "llama-plain,llama-server-plain,llama-server-ngram-mod,llama-server-draft-*")
    servers = [r for r in rows if r["engine"] == "llama-server"]
    assert sorted({r["method"] for r in servers}) == [
        "llama-server-draft-drafter-1m.gguf", "llama-server-ngram-mod", "llama-server-plain"]  # fmt: skip
    for row in servers:
        assert row["memory"]["process"] == "llama-server" and row["memory"]["peak_bytes"] > 0
        assert row["wall_seconds"] > 0 and row["prefill_seconds"] is not None
        if row["prompt_id"] == "completion-a":
            assert row["num_new_tokens"] == 6
        else:
            assert 0 < row["num_new_tokens"] <= 5
    by = {(r["method"], r["prompt_id"]): r for r in rows}
    # greedy with the same token ids in, f32 weights: the server's plain decoding equals llama-cpp-python's
    assert by[("llama-server-plain", "completion-a")]["matches_baseline"] is True
    draft = by[("llama-server-draft-drafter-1m.gguf", "completion-a")]
    assert draft["config"]["arguments"].count("-md") == 1 and "draft-simple" in draft["config"]["arguments"]


def test_peak_rss_of_a_process():
    peak, current = proc_peak_rss(os.getpid())
    assert peak >= current > 0
