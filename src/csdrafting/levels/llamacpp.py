"""Forward passes over a GGUF model through llama.cpp (``llama-cpp-python``'s low-level API).

Why it exists: on small models per-forward overhead decides the speed, and llama.cpp's graph runs
a pycode-sized forward several times faster than torch eager on a CPU.

One context, one sequence (id 0). The KV cache is llama.cpp's: rolling back rejected tokens is
``llama_memory_seq_rm`` of the positions from ``start`` on; the next batch then continues from
there. A draft tree (``forward_tree``) runs in one batch with one sequence id per leaf: every
node belongs to the sequences of the leaves below it, the cached context is copied (as metadata,
in the one unified cache) into every sequence, and llama.cpp's mask lets a token see the cells of
its sequence at positions up to its own, that is the context and its ancestors (position =
depth). ``keep`` then leaves the accepted path in sequence 0 and drops every other cell. Each batch flags only the positions whose logits are asked for, so llama.cpp computes the
vocabulary projection for those rows alone, and they are copied out of its buffer in one block.

Numerics (measured on pycode-1m f32, see ``scripts/llamacpp_costs.py``): with llama.cpp's flash
attention the K/V operands are f16 whatever the cache type, and a position's logits differ between
a batched and a one-token evaluation by up to ~2.4e-3 (1e-2 from transformers' float64). Without
it and with an f32 KV cache, both gaps are ~1e-5, at the same speed on these models. So the
defaults are flash attention off (as ``llama_cpp.Llama``'s) and an f32 cache: an f32 target then
computes what transformers computes in float32, and a near-tie rarely flips an argmax between a
verification batch and plain decoding.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError
from ..files import require_file

MAX_DEFAULT_CONTEXT = 8192  # a default context beyond this costs KV memory few generations use
MAX_UBATCH = 512  # llama.cpp's default micro-batch: longer inputs (prompts) run in chunks of this
_SEQ = 0  # the sequence this runner keeps (a draft tree uses more, for one forward)
TREE_SEQS = 32  # sequence ids for a draft tree's leaves (a tree with more is run path by path)
_GGML_TYPES = {"f32": 0, "f16": 1}  # ggml_type values for the KV cache
_FLASH_ATTN = {None: -1, False: 0, True: 1}  # llama_flash_attn_type: auto, disabled, enabled


def import_llama_cpp():
    """The ``llama_cpp`` module, imported on first use with a clear error when it is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("the llama.cpp backend needs llama-cpp-python: pip install -e '.[llama]'") from None
    except (OSError, RuntimeError) as exc:  # installed, but its shared library does not load
        raise ConfigError(f"llama-cpp-python is installed but its library failed to load: {exc}") from None
    return llama_cpp


def llama_extra_available() -> bool:
    """Whether the ``llama`` extra is usable: llama-cpp-python loads (``import_llama_cpp``) and gguf,
    the converter's writer, imports (``convert.import_gguf``)."""
    from ..convert import import_gguf

    try:
        import_llama_cpp()
        import_gguf()
    except ConfigError:
        return False
    return True


_backend_ready = False
_log_sink = None  # the no-op log callback; kept referenced, llama.cpp calls it for the process's life


def init_backend(lib, quiet: bool) -> None:
    """Initialise llama.cpp once per process; ``quiet`` routes its log lines to a no-op."""
    global _backend_ready, _log_sink
    if quiet and _log_sink is None:
        _log_sink = lib.llama_log_callback(lambda level, text, user_data: None)
        lib.llama_log_set(_log_sink, ctypes.c_void_p(0))
    if not _backend_ready:
        lib.llama_backend_init()
        _backend_ready = True


class LlamaCppRunner:
    """Forward passes of one GGUF language model over one sequence, with llama.cpp's KV cache."""

    runner_name = "llama.cpp"

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        kv_type: str = "f32",
        flash_attn: bool | None = False,
        quiet: bool = True,
    ) -> None:
        """``n_ctx``: context positions (default: the model's training context, at most
        MAX_DEFAULT_CONTEXT). ``n_threads``: default torch's CPU thread count. ``kv_type``: "f32"
        or "f16" (llama.cpp's default, half the memory). ``flash_attn``: None lets llama.cpp decide
        (the C library's default: on for a CPU)."""
        if kv_type not in _GGML_TYPES:
            raise ConfigError(f"kv_type must be one of {', '.join(_GGML_TYPES)}, got {kv_type!r}")
        self._lib = lib = import_llama_cpp()
        self._model = self._context = self._batch = None
        self.path = require_file(path, "GGUF file")
        init_backend(lib, quiet)
        self._model = self._load_model()
        self.vocab_size = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        self.num_params = int(lib.llama_model_n_params(self._model))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
        if n_ctx is None:
            n_ctx = min(self.n_ctx_train, MAX_DEFAULT_CONTEXT)
        self.n_threads = int(n_threads or torch.get_num_threads())
        self._context = self._new_context(n_ctx, kv_type, flash_attn)
        # llama.cpp rounds the context up (to a multiple of 256): the positions promised are n_ctx
        self.max_positions = min(n_ctx, int(lib.llama_n_ctx(self._context)))
        self._memory = lib.llama_get_memory(self._context)
        self._batch = lib.llama_batch_init(self.max_positions, 0, TREE_SEQS)
        self._batch_views = self._view_batch(self._batch, self.max_positions)
        self._position_ids = np.arange(self.max_positions, dtype=np.int32)  # sliced into the batch
        self.length = 0  # positions the KV cache holds (in sequence 0)
        self._tree: tuple[int, int, list[list[int]]] | None = None  # after forward_tree: base, leaves, seqs per node
        self.max_tree_leaves = TREE_SEQS
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def _load_model(self):
        lib = self._lib
        params = lib.llama_model_default_params()
        model = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not model:
            raise ModelLoadError(f"llama.cpp cannot load {self.path}: not a valid GGUF model file")
        vocab = lib.llama_model_get_vocab(model)
        reason = None
        if lib.llama_model_has_encoder(model) or not lib.llama_model_has_decoder(model):
            reason = "it is not a decoder-only language model"
        elif not vocab or lib.llama_vocab_n_tokens(vocab) <= 0:
            reason = "it has no vocabulary"
        if reason is not None:
            lib.llama_model_free(model)
            raise ModelLoadError(f"{self.path} cannot be a cascade level: {reason}")
        return model

    def _new_context(self, n_ctx: int, kv_type: str, flash_attn: bool | None):
        lib = self._lib
        if n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1, got {n_ctx}")
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx  # one llama_decode takes any forward that fits the context
        params.n_ubatch = min(MAX_UBATCH, n_ctx)
        params.n_seq_max = TREE_SEQS
        params.kv_unified = True  # one cache for every sequence: a tree's sequences share the context
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = _GGML_TYPES[kv_type]
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        params.no_perf = True
        context = lib.llama_init_from_model(self._model, params)
        if not context:
            raise ModelLoadError(f"llama.cpp cannot create a context of {n_ctx} positions for {self.path}")
        return context

    @staticmethod
    def _view_batch(batch, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """numpy views of the batch's token, position and logits-flag arrays, so a forward fills
        them with slice assignments; every slot belongs to sequence 0, set here once."""
        for i in range(capacity):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = _SEQ
        tokens = np.ctypeslib.as_array(batch.token, shape=(capacity,))
        positions = np.ctypeslib.as_array(batch.pos, shape=(capacity,))
        wants_logits = np.ctypeslib.as_array(batch.logits, shape=(capacity,))
        return tokens, positions, wants_logits

    def forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        """Drop cached positions >= start, run ``token_ids`` (T,) at positions start..start+T-1 and
        return logits (num_logits, V), float32, for the last ``num_logits`` of them."""
        num_new = len(token_ids)
        if not 0 <= start <= self.length:
            raise RuntimeError(f"cache holds {self.length} positions, cannot start at {start}")
        if not 0 <= num_logits <= num_new:
            raise ValueError(f"num_logits must be in [0, {num_new}], got {num_logits}")
        if start + num_new > self.max_positions:
            raise ValueError(f"positions up to {start + num_new} exceed the context of {self.max_positions}")
        self._crop(start)
        if num_new:
            self._decode(token_ids, start, num_logits)
        if num_logits == 0:
            return torch.empty((0, self.vocab_size), dtype=torch.float32)
        return self._copy_logits(num_logits)

    def _copy_logits(self, num_logits: int) -> torch.Tensor:
        """The output rows of the last decode, (N, V), copied once out of llama.cpp's buffer (which
        the next decode overwrites). A ctypes array over the buffer read by np.frombuffer: about
        20 us cheaper per call than np.ctypeslib.as_array, which dominates a small model's step."""
        address = ctypes.addressof(self._lib.llama_get_logits(self._context).contents)
        block = (ctypes.c_float * (num_logits * self.vocab_size)).from_address(address)
        rows = np.frombuffer(block, dtype=np.float32).reshape(num_logits, self.vocab_size)
        return torch.from_numpy(rows.copy())  # (N, V)

    def _crop(self, start: int) -> None:
        self._drop_tree()
        if start < self.length:
            if not self._lib.llama_memory_seq_rm(self._memory, _SEQ, start, -1):
                raise RuntimeError(f"llama.cpp could not drop cached positions from {start}")
            self.length = start

    def forward_tree(self, token_ids: list[int], parents: list[int], start: int, num_logits: int) -> torch.Tensor:
        """Run a tree of T tokens after the cached positions before ``start`` (token i's parent is
        ``parents[i]``, -1: position start - 1), token i at position start + its depth - 1, each
        attending to the cache and its ancestors only. Returns logits (num_logits, V) of the last
        ``num_logits`` tokens; ``keep`` then keeps one path (module docstring)."""
        num_new = len(token_ids)
        if not 0 <= start <= self.length:
            raise RuntimeError(f"cache holds {self.length} positions, cannot start at {start}")
        if not 0 < num_logits <= num_new:
            raise ValueError(f"num_logits must be in [1, {num_new}], got {num_logits}")
        if start + num_new > self.max_positions:
            raise ValueError(f"positions up to {start + num_new} exceed the context of {self.max_positions}")
        has_child = set(parents)
        leaves = [node for node in range(num_new) if node not in has_child]
        if len(leaves) > TREE_SEQS:
            raise ValueError(f"a tree of {len(leaves)} leaves exceeds the {TREE_SEQS} sequences of this runner")
        seqs: list[list[int]] = [[] for _ in range(num_new)]  # a node's sequences: its leaves'
        for seq, leaf in enumerate(leaves):
            node = leaf
            while node >= 0:
                seqs[node].append(seq)
                node = parents[node]
        depths = []
        for parent in parents:
            depths.append(depths[parent] + 1 if parent >= 0 else 0)
        self._crop(start)
        lib, memory, batch = self._lib, self._memory, self._batch
        for seq in range(1, len(leaves)):
            lib.llama_memory_seq_cp(memory, _SEQ, seq, -1, -1)  # the cached context, in every sequence
        for i, node_seqs in enumerate(seqs):
            batch.n_seq_id[i] = len(node_seqs)
            row = batch.seq_id[i]
            for j, seq in enumerate(node_seqs):
                row[j] = seq
        tokens, positions, wants_logits = self._batch_views
        tokens[:num_new] = token_ids
        positions[:num_new] = np.asarray(depths, dtype=np.int32) + start
        wants_logits[:num_new] = 0
        wants_logits[num_new - num_logits : num_new] = 1
        batch.n_tokens = num_new
        # from here on the cache holds the tree, whatever happens: _drop_tree cleans it up
        self._tree = (start, len(leaves), seqs)
        status = lib.llama_decode(self._context, batch)
        for i in range(num_new):  # every slot back to sequence 0 alone, as _decode expects
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = _SEQ
        if status != 0:
            self._drop_tree()
            raise RuntimeError(f"llama_decode failed with status {status} (a tree of {num_new} tokens at {start})")
        return self._copy_logits(num_logits)

    def keep(self, base: int, slots: list[int]) -> None:
        """After ``forward_tree``: keep the path whose nodes are ``slots`` (tree node indices
        counted from position ``base``, the first node after the context) in sequence 0, at
        positions base, base + 1, ...; every other tree cell is dropped."""
        if self._tree is None:
            raise RuntimeError("keep() needs a forward_tree() before it")
        start, num_leaves, seqs = self._tree
        offset = base - start  # tree tokens before the nodes (the catch-up of the context)
        winner = seqs[offset + slots[-1]][0] if slots else _SEQ
        lib, memory = self._lib, self._memory
        for seq in range(num_leaves):
            if seq != winner:
                lib.llama_memory_seq_rm(memory, seq, -1, -1)  # context cells live on in the winner
        if winner != _SEQ:
            lib.llama_memory_seq_cp(memory, winner, _SEQ, -1, -1)
            lib.llama_memory_seq_rm(memory, winner, -1, -1)
        self.length = base + len(slots)
        lib.llama_memory_seq_rm(memory, _SEQ, self.length, -1)  # the winner's nodes below the path
        self._tree = None

    def _drop_tree(self) -> None:
        """Forget a tree no ``keep`` followed: only sequence 0's cells before it stay."""
        if self._tree is None:
            return
        start, num_leaves, _ = self._tree
        for seq in range(1, num_leaves):
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._lib.llama_memory_seq_rm(self._memory, _SEQ, start, -1)
        self.length = min(self.length, start)
        self._tree = None

    def _decode(self, token_ids: list[int], start: int, num_logits: int) -> None:
        num_new = len(token_ids)
        tokens, positions, wants_logits = self._batch_views
        tokens[:num_new] = token_ids
        positions[:num_new] = self._position_ids[start : start + num_new]
        wants_logits[:num_new] = 0
        wants_logits[num_new - num_logits : num_new] = 1
        self._batch.n_tokens = num_new
        status = self._lib.llama_decode(self._context, self._batch)
        if status != 0:
            # a failed decode may leave some micro-batches in the cache: drop them all
            self._lib.llama_memory_seq_rm(self._memory, _SEQ, start, -1)
            raise RuntimeError(f"llama_decode failed with status {status} ({num_new} tokens at position {start})")
        self.length = start + num_new

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._context is not None:
            lib.llama_free(self._context)
            self._context = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()


def greedy_with_margins(runner: LlamaCppRunner, prompt_ids: list[int], num_new: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding on ``runner`` (one token per forward) and each step's top-2 logit
    margin: the reference identity checks compare a cascade with, where a margin within rounding
    error may flip an argmax between a batched and a one-token forward."""
    logits = runner.forward(prompt_ids, 0, 1)[0]
    ids, margins = [], []
    for _ in range(num_new):
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
        logits = runner.forward([ids[-1]], len(prompt_ids) + len(ids) - 1, 1)[0]
    return ids, margins
