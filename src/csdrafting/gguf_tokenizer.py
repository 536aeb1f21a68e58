"""A tokenizer over the vocabulary stored in a GGUF file, for a model family that has no HF
tokenizer beside it (``loading.target_tokenizer`` picks it for a ``.gguf`` target)."""

from __future__ import annotations

import ctypes
import os

from .errors import ModelLoadError
from .files import require_file
from .levels.llamacpp import import_llama_cpp, init_backend


class LlamaCppTokenizer:
    """The part of an HF tokenizer the cascade, its output and the server use, over the
    vocabulary stored in a GGUF file (for a family that has no HF tokenizer beside it).

    Decoding uses the C ``llama_detokenize`` (``llama_cpp.Llama.detokenize`` reads each piece into
    a 32-byte buffer and drops longer ones). ``chat_template`` is None: the server then formats
    chat messages as plain text rather than run a Jinja template it cannot check.
    """

    chat_template = None

    def __init__(self, gguf_path: str | os.PathLike) -> None:
        self._lib = lib = import_llama_cpp()
        self._model = None
        self.path = require_file(gguf_path, "GGUF file")
        init_backend(lib, quiet=True)
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
