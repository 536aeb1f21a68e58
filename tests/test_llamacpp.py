"""The llama.cpp backend: ``csd convert`` (HF Llama folder -> GGUF) and ``LlamaCppRunner``.

* Round trip: a converted f32 GGUF gives transformers' logits (float64 reference) up to llama.cpp's
  float32 rounding; f16 / bf16 / q8_0 within looser bounds; a converter that forgets the RoPE row
  permutation is rejected by the same check.
* The pycode tokenizer converts: llama.cpp tokenizes the committed prompts (and awkward strings)
  exactly as the HF tokenizer does, adds no BOS, and pycode-1m's logits match transformers'.
* KV cache: after any draft / verify / rollback traffic, the runner's logits equal a fresh
  evaluation of the same prefix (within llama.cpp's batched-vs-single tolerance).
* Bad input: unknown outtype, non-Llama architecture, missing folder, corrupt or non-LM GGUF, and
  llama_cpp missing are typed errors; the CLI prints one error line.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from csdrafting import ConfigError, ModelLoadError
from csdrafting.cli import main
from csdrafting.levels.memo import PrefixMemoLevel, common_prefix_length
from csdrafting.paths import DEFAULT_PROMPTS_FILE, MODELS_DIR
from tiny import tiny_llama

PYCODE_1M = MODELS_DIR / "pycode-1m"
HAS_LLAMA = all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf"))
needs_llama = pytest.mark.skipif(
    not HAS_LLAMA, reason="llama-cpp-python / gguf not installed: pip install -e '.[llama]'"
)

# Largest |logit difference| allowed against transformers in float64 (logits here span about +-8,
# std 2.4). f32 is llama.cpp's float32 rounding (measured ~1e-5; the runner's default KV cache is f32,
# flash attention off). For the other types llama.cpp also rounds the *activations* to the weights'
# type before each matmul (q8_0 for q8_0 weights), so the gap stays large even against transformers
# run on the same rounded weights (measured: f16 0.03, bf16 0.25, q8_0 0.7 on these peaky models).
TOLERANCE = {"f32": 1e-3, "f16": 0.1, "bf16": 0.5, "q8_0": 1.2}
# the same runner, same sequence, batched differently (measured: ~1e-5 on these models)
BATCHING_TOLERANCE = 1e-4


def convert(folder, output, outtype):
    from csdrafting.convert import convert

    return convert(folder, output, outtype)


def runner(path, **options):
    from csdrafting.levels.llamacpp import LlamaCppRunner

    return LlamaCppRunner(path, **options)


def torch_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' logits (T, V) for the whole sequence, float64."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (GQA, untied head, rows a multiple of 32 so q8_0 applies) and its folder."""
    model = tiny_llama(0, vocab_size=96, hidden_size=64, num_heads=4, num_kv_heads=2)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tiny_f32(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    convert(tiny[1], path, "f32")
    return path


IDS = [5, 17, 33, 2, 81, 40, 7, 7, 64, 12, 90, 3, 55, 21, 8, 0, 44, 19, 71, 30]


# -- conversion round trip ----------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_converted_logits_match_transformers(tiny, tmp_path, outtype):
    model, folder = tiny
    result = convert(folder, tmp_path / "m.gguf", outtype)
    assert result.fallback_tensors == () and not result.has_tokenizer
    run = runner(result.path)
    assert (run.vocab_size, run.num_params) == (96, sum(p.numel() for p in model.parameters()))
    logits = run.forward(IDS, 0, len(IDS))  # (T, V)
    assert logits.dtype == torch.float32 and logits.shape == (len(IDS), 96)
    expected = torch_logits(model, IDS)
    error = (logits.double() - expected).abs().max().item()
    assert error < TOLERANCE[outtype], error
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    if outtype != "f32":  # the weights really are stored in that type: not an f32 file under another name
        assert error > 1e-5, error


@needs_llama
def test_tensor_types_in_the_file(tiny, tmp_path):
    import gguf

    result = convert(tiny[1], tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(result.path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0  # untied: the head is written
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32


@needs_llama
def test_f16_kv_cache_and_flash_attention_are_close(tiny, tiny_f32):
    """llama.cpp's own defaults (f16 cache; flash attention, which computes in f16) round more."""
    logits = runner(tiny_f32, kv_type="f16", flash_attn=None).forward(IDS, 0, len(IDS))
    error = (logits.double() - torch_logits(tiny[0], IDS)).abs().max().item()
    assert error < TOLERANCE["f16"], error


@needs_llama
def test_forgetting_the_rope_permutation_is_caught(tiny, tmp_path, monkeypatch):
    """The round-trip check has teeth: q/k rows left in HF's rotate-half order give other logits."""
    import csdrafting.convert as converter

    monkeypatch.setattr(converter, "pairs_from_halves", lambda weight, num_heads: weight)
    broken = converter.convert(tiny[1], tmp_path / "broken.gguf", "f32")
    logits = runner(broken.path).forward(IDS, 0, len(IDS))
    assert (logits.double() - torch_logits(tiny[0], IDS)).abs().max().item() > 100 * TOLERANCE["f32"]


@needs_llama
def test_tied_embeddings_and_q8_0_fallback(tmp_path):
    """hidden 48 is not a multiple of q8_0's 32-value blocks: those matrices are kept in f16."""
    model = tiny_llama(1, hidden_size=48)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "hf")
    result = convert(tmp_path / "hf", tmp_path / "m.gguf", "q8_0")
    assert "token_embd.weight" in result.fallback_tensors and "blk.0.ffn_down.weight" not in result.fallback_tensors
    logits = runner(result.path).forward(IDS, 0, 4)
    error = (logits.double() - torch_logits(model, IDS)[-4:]).abs().max().item()
    assert error < TOLERANCE["q8_0"], error


# -- the real pycode tokenizer --------------------------------------------------------------------
# (pycode_gguf: gguf_fixtures.py)

AWKWARD = [
    "x = 1\n\n\n    return  y  \n",
    "it's they'll we've I'd\tTAB\t\tend ",
    "naïve café 日本語 ✓ 🙂 ñ",
    "3.14159 + 1e-10 == 0x1F; 12345678",
    "   leading spaces and trailing   ",
    "\n",
    "a<|endoftext|>b",
    "x += ' ' , y . z ! a ? do n't I 'm it 's",  # llama.cpp's "gpt-2" name would strip these spaces
]


class LlamaCppVocab:
    """llama.cpp's own tokenizer through the C API. (llama_cpp.Llama.detokenize is not used: it
    reads each piece into a 32-byte buffer and drops longer ones, and pycode has 37-byte
    whitespace tokens.)"""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self.lib = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        tokens = (self.lib.llama_token * (len(data) + 8))()
        # add_special=True: llama.cpp adds BOS/EOS exactly when the file says the tokenizer does
        count = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, len(tokens), True, True)
        assert count >= 0
        return list(tokens[:count])

    def detokenize(self, ids: list[int]) -> str:
        buffer = ctypes.create_string_buffer(64 * len(ids) + 64)
        tokens = (self.lib.llama_token * len(ids))(*ids)
        count = self.lib.llama_detokenize(self.vocab, tokens, len(ids), buffer, len(buffer), False, True)
        assert count >= 0
        return buffer.raw[:count].decode()

    def close(self) -> None:
        self.lib.llama_model_free(self.model)


@needs_llama
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(pycode_gguf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(PYCODE_1M)
    vocab = LlamaCppVocab(pycode_gguf)
    texts = [json.loads(line)["text"] for line in DEFAULT_PROMPTS_FILE.read_text().splitlines()] + AWKWARD
    assert len(texts) >= 10
    for text in texts:
        expected = hf(text)["input_ids"]  # the HF tokenizer adds no BOS
        assert vocab.tokenize(text) == expected, text[:60]
        assert vocab.detokenize(expected) == text == hf.decode(expected)
    assert vocab.lib.llama_vocab_eos(vocab.vocab) == 0 == hf.eos_token_id
    assert vocab.lib.llama_vocab_n_tokens(vocab.vocab) == hf.vocab_size
    vocab.close()


@needs_llama
def test_pycode_logits_match_transformers(pycode_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(PYCODE_1M, dtype=torch.float64).eval()
    ids = AutoTokenizer.from_pretrained(PYCODE_1M)("def parse_args(argv):\n    parser = ")["input_ids"]
    run = runner(pycode_gguf)
    assert run.max_positions == 2048 and run.vocab_size == 8192
    logits = run.forward(ids, 0, 3)
    assert (logits.double() - torch_logits(model, ids)[-3:]).abs().max().item() < TOLERANCE["f32"]


# -- KV cache: rollback and catch-up --------------------------------------------------------------


@needs_llama
def test_rollback_and_catch_up_equal_a_fresh_evaluation(tiny_f32):
    """Random draft / verify / rollback traffic through PrefixMemoLevel (the engine's bookkeeping)."""
    level = PrefixMemoLevel("t", runner(tiny_f32))
    fresh = runner(tiny_f32)
    rng = random.Random(0)
    ids = [rng.randrange(96) for _ in range(6)]
    cached: list[int] = []  # what the level has run, to predict what it must run next
    moves = Counter()
    for op in range(60):
        move = rng.choice(["extend", "rollback", "diverge", "prefill"])
        if move == "extend":  # accepted draft plus new draft tokens
            ids = ids + [rng.randrange(96) for _ in range(rng.randint(1, 5))]
        elif move == "rollback":  # rejected draft: a strict prefix of what is cached
            ids = ids[: rng.randint(1, len(ids))]
        elif move == "diverge":  # rejected draft replaced by different tokens
            keep = rng.randint(1, len(ids))
            ids = ids[:keep] + [(t + 1) % 96 for t in ids[keep:]] + [rng.randrange(96)]
        else:
            ids = ids + [rng.randrange(96) for _ in range(rng.randint(0, 4))]
            level.prefill(ids)
            cached = list(ids)
            ids = ids + [rng.randrange(96)]
        ids = ids[: fresh.max_positions]
        num_positions = rng.randint(1, min(6, len(ids)))
        before = level.counters.num_tokens_run
        logits = level.next_token_logits(ids, num_positions)
        assert level.runner.length == level.num_cached == len(ids)
        expected_run = len(ids) - min(common_prefix_length(cached, ids), len(ids) - num_positions)
        assert level.counters.num_tokens_run - before == expected_run
        cached = list(ids)
        error = (logits - fresh.forward(ids, 0, num_positions)).abs().max().item()
        assert error < BATCHING_TOLERANCE, f"op {op} ({move}): {error}"
        moves[move] += 1
    assert min(moves.values()) > 5, moves


@needs_llama
def test_forward_edges(tiny_f32):
    from csdrafting.levels.base import Runner

    run = runner(tiny_f32)
    assert isinstance(run, Runner) and run.runner_name == "llama.cpp"
    assert run.forward(IDS[:5], 0, 0).shape == (0, 96) and run.length == 5
    assert run.forward([], 3, 0).shape == (0, 96) and run.length == 3  # a pure rollback
    with pytest.raises(RuntimeError, match="cannot start at 4"):
        run.forward([1], 4, 1)
    with pytest.raises(ValueError, match="num_logits"):
        run.forward([1, 2], 3, 3)
    with pytest.raises(ValueError, match="context"):
        run.forward([1] * (run.max_positions + 1), 0, 1)
    one = run.forward(IDS[3:6], 3, 3)  # catch-up after the rollback
    assert one.shape == (3, 96) and run.length == 6
    run.close()
    run.close()  # idempotent


@needs_llama
def test_context_and_threads(tiny_f32):
    run = runner(tiny_f32, n_ctx=64, n_threads=2)
    assert run.max_positions == 64 and run.n_threads == 2
    assert runner(tiny_f32).max_positions == 256  # the model's training context (tiny_llama's default)


# -- bad input ------------------------------------------------------------------------------------


@needs_llama
def test_unknown_outtype(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown outtype 'q4_k'.*f32, f16, bf16, q8_0"):
        convert(tiny[1], tmp_path / "m.gguf", "q4_k")
    assert not list(tmp_path.iterdir())


@needs_llama
def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="model_type is 'gpt2', not 'llama'"):
        convert(tmp_path / "gpt2", tmp_path / "m.gguf", "f32")


@needs_llama
def test_missing_folder_and_weights(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        convert(tmp_path / "nope", tmp_path / "m.gguf", "f32")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tiny[1] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        convert(tmp_path / "empty", tmp_path / "m.gguf", "f32")


@needs_llama
def test_corrupt_or_non_lm_gguf(tiny_f32, tmp_path):
    import gguf
    import numpy as np

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_f32.read_bytes()[: tiny_f32.stat().st_size // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    not_lm = tmp_path / "not-lm.gguf"  # a valid GGUF of an architecture llama.cpp cannot run as an LM
    writer = gguf.GGUFWriter(not_lm, "clip")
    writer.add_tensor("v.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path in (truncated, garbage, not_lm):
        with pytest.raises(ModelLoadError, match="llama.cpp cannot load"):
            runner(path)
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        runner(tmp_path / "absent.gguf")


def test_missing_llama_cpp_names_the_extra(monkeypatch):
    from csdrafting.levels.llamacpp import import_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[llama\]'"):
        import_llama_cpp()


@needs_llama
def test_cli_convert(tiny, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["convert", str(tiny[1]), "-o", str(out), "--outtype", "q8_0"]) == 0
    assert out.is_file() and "q8_0" in capsys.readouterr().out
    assert main(["convert", str(tiny[1]), "-o", str(out), "--outtype", "q4"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: unknown outtype 'q4'") and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "nope"), "-o", str(out)]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: model folder not found") and err.count("\n") == 1
