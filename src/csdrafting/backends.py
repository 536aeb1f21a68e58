"""Which backend runs a level: torch (transformers, or the lean Llama runner) or llama.cpp.

Rules (``loading.load_levels`` applies them):
* a path ending in ``.gguf`` always loads with llama.cpp, whatever ``backend`` says, so a torch
  target with GGUF drafters (or the reverse) is a cascade of mixed backends;
* an HF folder with ``backend="llama.cpp"`` is converted to a GGUF once and cached
  (``gguf_cache.py``), then loads with llama.cpp;
* an HF folder with ``backend="torch"`` loads with transformers (``levels/model.py``).
"""

from __future__ import annotations

import os

from .levels.memo import PrefixMemoLevel

TORCH = "torch"
LLAMA_CPP = "llama.cpp"


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def level_backend(path: str, backend: str) -> str:
    """The backend that runs the level at ``path``: llama.cpp for a .gguf file, else ``backend``."""
    return LLAMA_CPP if is_gguf(path) else backend


def llama_level(name: str, gguf_path: str | os.PathLike) -> PrefixMemoLevel:
    """A neural level over a GGUF file; threads from torch (``--threads``), context from the model."""
    from .levels.llamacpp import LlamaCppRunner

    return PrefixMemoLevel(name, LlamaCppRunner(gguf_path))
