"""Loading levels on llama.cpp: which backend runs a level, the GGUF conversion cache, and a
tokenizer over a GGUF's own vocabulary.

Rules (``loading.load_levels`` applies them):
* a path ending in ``.gguf`` always loads with llama.cpp, whatever ``backend`` says, so a torch
  target with GGUF drafters (or the reverse) is a cascade of mixed backends;
* an HF folder with ``backend="llama.cpp"`` is converted (``convert.py``) on first use to a GGUF in
  ``$XDG_CACHE_HOME/csdrafting/gguf/``; the target keeps the precision it runs in (``dtype``,
  float32 by default, so f32), drafters get
  ``drafter_outtype`` (default ``DEFAULT_DRAFTER_OUTTYPE``);
* an HF folder with ``backend="torch"`` loads with transformers.

Cache key: a SHA-256 over the bytes of every file in the folder (names included), the output
type and ``CONVERTER_VERSION``. Reading the bytes costs ~0.1 s for pycode-22m's 88 MB, and unlike
size + mtime it cannot miss an edit that keeps both. The file is converted into a temporary
file beside its final name and renamed into place, so a killed process never leaves a corrupt
GGUF under the final name, and two processes converting at once both end with a whole file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
from pathlib import Path

from .convert import OUTTYPES
from .errors import ConfigError, ModelLoadError
from .levels.kernels import cache_dir
from .levels.memo import PrefixMemoLevel

TORCH = "torch"
LLAMA_CPP = "llama.cpp"
# Drafters may be approximate (the target verifies every token), so they get the fastest type.
# Measured in phase 1 (scripts/llamacpp_costs.py, AMD EPYC, 2 threads, one-token forward):
# pycode-5m q8_0 0.80 ms vs f32 1.14 ms; pycode-1m q8_0 0.45 ms vs f32 0.48 ms -> q8_0.
DEFAULT_DRAFTER_OUTTYPE = "q8_0"
# bump when convert.py's output changes for the same folder, so old cached files are not reused
CONVERTER_VERSION = 1
# CascadeConfig.dtype -> the GGUF type a converted target computes in
_TARGET_OUTTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f32"}


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def level_backend(path: str, backend: str) -> str:
    """The backend that runs the level at ``path``: llama.cpp for a .gguf file, else ``backend``."""
    return LLAMA_CPP if is_gguf(path) else backend


def gguf_cache_dir() -> Path:
    return cache_dir() / "gguf"


def folder_key(folder: Path, outtype: str) -> str:
    """Hash of the folder's content (every file's name and bytes), the outtype and the converter."""
    digest = hashlib.sha256(f"csd-gguf:{CONVERTER_VERSION}:{outtype}".encode())
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(b"\0" + file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def target_outtype(dtype: str) -> str:
    """The GGUF type of a converted target: the precision the torch backend would run it in
    (``CascadeConfig.dtype``, float32 by default), so the target is exact whatever its drafters.
    (The pycode folders store bf16 weights; float32 holds them exactly and computes as torch does.)"""
    return _TARGET_OUTTYPES[dtype]


def cached_gguf(folder: str | os.PathLike, outtype: str, cache: Path | None = None) -> Path:
    """The GGUF of HF ``folder`` in ``outtype``, converted on first use and reused afterwards."""
    from .convert import convert

    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    cache = cache or gguf_cache_dir()
    path = cache / f"{folder.name}-{outtype}-{folder_key(folder, outtype)}.gguf"
    if path.is_file():
        return path
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=cache)
        os.close(handle)
    except OSError as exc:
        raise ModelLoadError(f"cannot write the GGUF cache {cache}: {exc}") from None
    try:
        convert(folder, temporary, outtype)
        os.replace(temporary, path)  # atomic: readers see no file or a whole one
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def llama_level(name: str, gguf_path: str | os.PathLike) -> PrefixMemoLevel:
    """A neural level over a GGUF file; threads from torch (``--threads``), context from the model."""
    from .levels.llamacpp import LlamaCppRunner

    return PrefixMemoLevel(name, LlamaCppRunner(gguf_path))


class LlamaCppTokenizer:
    """The part of an HF tokenizer the cascade, its output and the server use, over the
    vocabulary stored in a GGUF file (for a family that has no HF tokenizer beside it).

    Decoding uses the C ``llama_detokenize`` (``llama_cpp.Llama.detokenize`` reads each piece into
    a 32-byte buffer and drops longer ones). ``chat_template`` is None: the server then formats
    chat messages as plain text rather than run a Jinja template it cannot check.
    """

    chat_template = None

    def __init__(self, gguf_path: str | os.PathLike) -> None:
        from .levels.llamacpp import _init_backend, import_llama_cpp

        self._lib = lib = import_llama_cpp()
        self._model = None
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file not found: {self.path}")
        _init_backend(lib, quiet=True)
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self._model = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self._model:
            raise ModelLoadError(f"llama.cpp cannot load {self.path}: not a valid GGUF model file")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        eos = int(lib.llama_vocab_eos(self._vocab))
        self.eos_token_id = eos if eos >= 0 else None
        # a GGUF converted without a tokenizer has placeholder tokens: ids only, nothing to compare
        self.has_vocabulary = int(lib.llama_vocab_type(self._vocab)) != lib.LLAMA_VOCAB_TYPE_NONE
        # end-of-generation tokens from the GGUF metadata (eos, eot, ...)
        self.eos_token_ids = frozenset(i for i in range(self.vocab_size) if lib.llama_vocab_is_eog(self._vocab, i))

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            tokens = (self._lib.llama_token * capacity)()
            # parse_special=True: special-token text in a prompt becomes that token, as in HF tokenizers
            count = self._lib.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special_tokens, True)
            if count >= 0:
                return list(tokens[:count])
            capacity = -count  # a negative count is the size needed
        raise ModelLoadError(f"llama.cpp could not tokenize a text of {len(data)} bytes")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        tokens = (self._lib.llama_token * len(ids))(*ids)
        capacity = 16 * len(ids) + 64
        for _ in range(2):
            buffer = ctypes.create_string_buffer(capacity)
            # unparse_special=False renders special (control) tokens as nothing, like skip_special_tokens
            count = self._lib.llama_detokenize(
                self._vocab, tokens, len(ids), buffer, capacity, False, not skip_special_tokens
            )
            if count >= 0:
                return buffer.raw[:count].decode("utf-8", errors="replace")
            capacity = -count
        raise ModelLoadError(f"llama.cpp could not detokenize {len(ids)} tokens")

    def get_vocab(self) -> dict[str, int]:
        """Token text -> id, as stored in the GGUF (byte-level BPE texts, as in HF's ``get_vocab``)."""
        get_text = self._lib.llama_vocab_get_text
        return {get_text(self._vocab, i).decode("utf-8", errors="replace"): i for i in range(self.vocab_size)}

    def close(self) -> None:
        if self._model is not None:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        if getattr(self, "_model", None) is not None:
            self.close()
