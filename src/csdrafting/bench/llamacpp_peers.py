"""llama-cpp-python's own decoding as peers in ``csd bench``: ``Llama.generate`` on the target
GGUF, plain (greedy or sampled) and with ``LlamaPromptLookupDecoding`` as its ``draft_model``,
with the runner's context settings (same threads, f32 KV cache, flash attention off), so both
sides compute the same logits.

Our own methods on llama.cpp run over ``Models.llama_levels`` (``models.py``): every model folder
is converted once into the loader's cache (``gguf_cache.cached_gguf``), the target in f32, the
drafters at ``--drafter-outtype`` (a drafter only changes speed, never the output).
"""

from __future__ import annotations

import time

import torch

from ..errors import ConfigError
from ..levels.llamacpp import llama_extra_available
from .records import Outcome


def check_backends(backends: list[str]) -> list[str]:
    from .suite import BACKENDS

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"--backends takes a comma-separated list of {', '.join(BACKENDS)}, got {backends}")
    if "llama.cpp" in backends and not llama_extra_available():
        raise ConfigError("the llama.cpp backend needs llama-cpp-python and gguf: pip install -e '.[llama]'")
    return list(dict.fromkeys(backends))


class LlamaCppPeer:
    """A peer: llama-cpp-python's ``Llama.generate`` on the target GGUF, plain or with prompt
    lookup decoding (``LlamaPromptLookupDecoding(num_pred_tokens=N)`` as ``draft_model``)."""

    def __init__(self, method, models) -> None:
        import llama_cpp

        self.method = method
        self.models = models
        lookup = method.spec.get("prompt_lookup_num_tokens")
        draft_model = None
        if lookup is not None:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft_model = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
        threads = torch.get_num_threads()
        path = models.gguf(models.target_name)
        self.llm = llama_cpp.Llama(
            str(path),
            n_ctx=models.max_context,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=False,  # as LlamaCppRunner: f32 attention, the logits our levels compute
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            # llama-cpp-python turns logits_all on itself with a draft model, but sizes its logits
            # buffer by this flag: False there overflows once a sequence passes n_batch positions
            logits_all=draft_model is not None,
            draft_model=draft_model,
            verbose=False,
        )
        self.level_names = [models.target_name]
        self.config = {
            "engine": "llama.cpp",
            "target": models.target_name,
            "gguf": str(path),
            "prompt_lookup_num_tokens": lookup,
            "n_threads": threads,
            "llama_cpp_python": llama_cpp.__version__,
        }

    def generate(self, request):
        llm = self.llm
        eos = set(self.models.eos_token_ids)
        forwards = 0
        real_eval = llm.eval

        def counted_eval(tokens):  # one llama_decode per call at these lengths (n_batch = 512)
            nonlocal forwards
            forwards += 1
            return real_eval(tokens)

        llm.eval = counted_eval
        if request.greedy:
            options = dict(temp=0.0)
        else:  # temperature then top-k / top-p only: the warping our sampling applies
            options = dict(temp=request.temperature, top_k=request.top_k or 0, top_p=request.top_p or 1.0)
            llm.set_seed(request.seed)
        llm.reset()  # no KV reuse from the previous generation: every method prefills the prompt
        tokens: list[int] = []
        finish = "length"
        started = time.perf_counter()
        first_at = None
        try:
            for token in llm.generate(request.prompt_ids, min_p=0.0, repeat_penalty=1.0, **options):
                if first_at is None:
                    first_at = time.perf_counter()
                tokens.append(int(token))
                if not request.fixed_length and token in eos:
                    finish = "eos"
                    break
                if len(tokens) >= request.max_new_tokens:
                    break
        finally:
            del llm.eval
        wall = time.perf_counter() - started
        prefill = first_at - started if first_at is not None else None
        levels = [
            {
                "name": self.models.target_name,
                "kind": "target",
                "num_forwards": forwards,
                "num_params": self.models.num_params[self.models.target_name],
            }
        ]
        return Outcome.of_peer(tokens, finish, prefill, wall, levels, self.config)
