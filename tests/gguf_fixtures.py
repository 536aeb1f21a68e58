"""GGUF files of the committed models, converted once per session and shared by the llama.cpp
tests (test_llamacpp.py, test_llama_backend.py); registered by conftest.py."""

from __future__ import annotations

import importlib.util

import pytest

from csdrafting.paths import MODELS_DIR


@pytest.fixture(scope="session")
def pycode_gguf(tmp_path_factory):
    """pycode-1m converted to f32 (exact enough to compare its logits with transformers'), with
    the pycode tokenizer in the file."""
    if not all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf")):
        pytest.skip("llama-cpp-python / gguf not installed")
    from csdrafting.convert import convert

    result = convert(MODELS_DIR / "pycode-1m", tmp_path_factory.mktemp("pycode") / "pycode-1m-f32.gguf", "f32")
    assert result.has_tokenizer
    return result.path
