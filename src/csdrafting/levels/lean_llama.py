"""A lean runner for Llama-architecture weights: preallocated KV cache, rollback by position.

Why it exists: on small models the framework's per-forward overhead, not the arithmetic, decides
the speed (a 22M-parameter model does ~45 MFLOP per token, well under a millisecond of compute).
This runner does the same math as transformers' ``LlamaForCausalLM`` in as few tensor ops as
possible: fused QKV and gate/up projections, residual adds fused into the matmuls before them, a
KV buffer indexed by position (so "rolling back" rejected tokens is free: the next forward simply
writes over them) and logits only for the positions the caller asks for. Every matmul runs the
kernel, and every weight is stored in the layout, that ``kernels.py`` chose for this machine.

Shapes: T new tokens, S = start + T keys, H heads, Hkv key/value heads, D head dim, E hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import kernels
from .base import tree_layout


def supports(config) -> bool:
    """Whether a transformers config describes weights this runner computes exactly."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return (
        getattr(config, "model_type", None) == "llama"
        and rope.get("rope_type", "default") == "default"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
    )


class LlamaRunner:
    """Forward passes of one Llama model over one sequence, with a KV cache indexed by position."""

    runner_name = "lean"

    def __init__(self, model: torch.nn.Module, kernel: str = kernels.AUTO, own_weights: bool = False) -> None:
        """``kernel``: ``auto`` (time the candidates, ``kernels.py``) or one kernel for every
        matmul (``CascadeConfig.kernel``). ``own_weights``: the module is the runner's
        alone, so its weights may take any layout: transposed (the module's parameters become
        ``.t()`` views: it runs, but ``save_pretrained`` fails on them) or oneDNN's packed blocks
        (the module's parameters are released: it no longer runs). Without it every weight keeps
        transformers' layout, the module's parameters are contiguous row slices of the runner's
        fused matrices (one copy in memory), and the module is as usable as before."""
        config = model.config
        if not supports(config):
            raise ConfigError(
                "the lean runner computes plain Llama models only (default RoPE, no biases, SiLU); "
                "use runner 'auto' or 'transformers' for this model"
            )
        self.num_params = sum(p.numel() for p in model.parameters())
        self.vocab_size = int(config.vocab_size)
        embed = model.get_parameter("model.embed_tokens.weight")
        self.device = embed.device
        self.dtype = embed.dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.intermediate = config.intermediate_size
        embed_is_head = model.get_parameter("lm_head.weight").data_ptr() == embed.data_ptr()
        self.shapes = {  # (out, in) of every matmul: the projections of one layer, the output layer
            "qkv": (self.q_size + 2 * self.kv_size, config.hidden_size),
            "o": (config.hidden_size, self.q_size),
            "gate_up": (2 * self.intermediate, config.hidden_size),
            "down": (config.hidden_size, self.intermediate),
            "head": (self.vocab_size, config.hidden_size),
        }
        layouts = {name: kernels.LAYOUTS if own_weights else ("plain",) for name in self.shapes}
        if embed_is_head:  # the tied table also serves the token lookup, which cannot read packed blocks
            layouts["head"] = tuple(layout for layout in layouts["head"] if layout != "packed")
        self.choices = kernels.plan(self.shapes, self.device, self.dtype, kernel, layouts)
        self._store_weights(model, embed_is_head)
        if any(choice.layout == "packed" for choice in self.choices.values()):
            model.register_forward_pre_hook(_weights_moved)
        # per bucket of token counts: the layer's four matmuls (the two before a residual add
        # fused with it) and the output layer's, each the kernel chosen for that bucket
        self._layer_kernels = [
            (
                self.choices["qkv"].kernel(b).matmul,
                self.choices["o"].kernel(b).matmul_add,
                self.choices["gate_up"].kernel(b).matmul,
                self.choices["down"].kernel(b).matmul_add,
            )
            for b in range(len(kernels.BUCKETS))
        ]
        self._head_kernels = [self.choices["head"].kernel(b).matmul for b in range(len(kernels.BUCKETS))]
        self.cos, self.signed_sin = _rope_tables(config, self.head_dim, self.max_positions, self.device, self.dtype)
        self.capacity = 0
        self.k_cache: torch.Tensor | None = None  # (L, Hkv, capacity, D)
        self.v_cache: torch.Tensor | None = None

    def _store_weights(self, model: torch.nn.Module, embed_is_head: bool) -> None:
        """Every matrix in its chosen layout, held once (``_store``); norms as they are."""
        layout = {name: choice.layout for name, choice in self.choices.items()}
        self.layers = []
        for i in range(model.config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            attn, mlp = prefix + "self_attn.", prefix + "mlp."
            self.layers.append(
                (
                    model.get_parameter(prefix + "input_layernorm.weight").detach(),
                    _store(
                        model, [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"], layout["qkv"]
                    ),
                    _store(model, [attn + "o_proj.weight"], layout["o"]),
                    model.get_parameter(prefix + "post_attention_layernorm.weight").detach(),
                    _store(model, [mlp + "gate_proj.weight", mlp + "up_proj.weight"], layout["gate_up"]),
                    _store(model, [mlp + "down_proj.weight"], layout["down"]),
                )
            )
        self.final_norm = model.get_parameter("model.norm.weight").detach()
        if embed_is_head:  # one table: in the head's layout, read by rows for the lookup
            self.lm_head = _store(model, ["model.embed_tokens.weight"], layout["head"])
            self.embed = self.lm_head if layout["head"] == "plain" else self.lm_head.t()  # (V, E)
        else:
            self.embed = model.get_parameter("model.embed_tokens.weight").detach()  # (V, E)
            self.lm_head = _store(model, ["lm_head.weight"], layout["head"])

    def _reserve(self, length: int) -> None:
        """Grow the KV buffers (keeping their contents) so that positions < length fit."""
        if length <= self.capacity:
            return
        capacity = min(self.max_positions, max(256, 2 * self.capacity, length))
        shape = (len(self.layers), self.num_kv_heads, capacity, self.head_dim)
        k_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        v_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        if self.k_cache is not None:
            k_cache[:, :, : self.capacity] = self.k_cache
            v_cache[:, :, : self.capacity] = self.v_cache
        self.k_cache, self.v_cache, self.capacity = k_cache, v_cache, capacity
        # each layer's slice as SDPA reads it, made once here instead of in every forward
        self.k_layers = [layer.unsqueeze(0) for layer in k_cache]  # L x (1, Hkv, capacity, D)
        self.v_layers = [layer.unsqueeze(0) for layer in v_cache]

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # one fused op; on float32 it gives the same bits as the op-by-op formula below
            return F.rms_norm(x, weight.shape, weight, self.eps)
        # in float32, as transformers does (even for float64 weights): same numbers, same argmax
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """RoPE as transformers computes it, x * cos + rotate_half(x) * sin, with the sign of
        rotate_half's negated half folded into the sin table (exact: a sign flip does not round),
        so rotate_half is a roll by half the head dim (one op, the same bits)."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin

    @torch.inference_mode()
    def forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        """Run ``token_ids`` (T) at positions start..start+T-1; return logits (num_logits, V)
        for the last ``num_logits`` of them. KV entries at positions >= start are overwritten.
        """
        num_new = len(token_ids)
        end = start + num_new
        # One query attends to every cached key; a whole prompt is plain causal attention. Other
        # multi-token forwards need a mask: additive (0 / -inf), built once here, because SDPA
        # would otherwise convert a boolean mask in every layer (same bits either way).
        mask, causal = None, num_new > 1 and start == 0
        if num_new > 1 and not causal:
            query_pos = torch.arange(start, end, device=self.device).unsqueeze(-1)  # (T, 1)
            hidden = torch.arange(end, device=self.device).unsqueeze(0) > query_pos  # (T, S)
            mask = torch.zeros(hidden.shape, device=self.device, dtype=self.dtype).masked_fill_(hidden, float("-inf"))
        return self._run(token_ids, start, slice(start, end), mask, causal, num_logits)

    @torch.inference_mode()
    def forward_tree(self, token_ids: list[int], parents: list[int], start: int, num_logits: int) -> torch.Tensor:
        """Run a tree of T tokens whose keys and values go to slots start..start+T-1; token i's
        parent is token ``parents[i]`` (-1: the cached position start - 1). Each token attends to
        the cache before ``start`` and to its ancestors, at RoPE position start + depth. Returns
        logits (num_logits, V) for the last ``num_logits`` tokens; ``keep`` then compacts a path."""
        num_new = len(token_ids)
        depths, block = tree_layout(parents, self.device)  # (T,), (T, T)
        mask = torch.zeros((num_new, start + num_new), device=self.device, dtype=self.dtype)  # (T, S)
        mask[:, start:].masked_fill_(~block, float("-inf"))
        positions = depths + start  # (T,)
        return self._run(token_ids, start, positions, mask, False, num_logits)

    @torch.inference_mode()
    def keep(self, base: int, slots: list[int]) -> None:
        """Move the keys and values at slots ``base + slots[j]`` to ``base + j`` (an accepted tree
        path into its positions; ``slots`` increasing, ``slots[j] >= j``); later slots are free."""
        if slots == list(range(len(slots))):
            return  # already in place
        source = torch.tensor(slots, dtype=torch.long, device=self.device) + base
        target = slice(base, base + len(slots))
        # the gather on the right copies before the write, so overlapping ranges are safe
        self.k_cache[:, :, target] = self.k_cache[:, :, source]
        self.v_cache[:, :, target] = self.v_cache[:, :, source]

    def _run(self, token_ids, start, positions, mask, causal, num_logits) -> torch.Tensor:
        """The layers over ``token_ids`` written to slots start..; ``positions`` (a slice or (T,)
        indices) select the RoPE rows; ``mask`` (T, S) additive or None."""
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)  # (T,)
        num_new = input_ids.shape[0]
        end = start + num_new
        self._reserve(end)
        x = F.embedding(input_ids, self.embed)  # (T, E)
        cos = self.cos[positions]  # (T, D): broadcasts over (1, H, T, D)
        signed_sin = self.signed_sin[positions]
        gqa = self.num_kv_heads != self.num_heads
        mm_qkv, mm_o_add, mm_gate_up, mm_down_add = self._layer_kernels[kernels.bucket_index(num_new)]
        num_qk = self.num_heads + self.num_kv_heads
        qkv_shape = (1, num_new, num_qk + self.num_kv_heads, self.head_dim)
        for (norm1, w_qkv, w_o, norm2, w_gate_up, w_down), k_layer, v_layer in zip(
            self.layers, self.k_layers, self.v_layers
        ):
            qkv = mm_qkv(self._rms_norm(x, norm1), w_qkv).view(qkv_shape).transpose(1, 2)  # (1, H + 2 Hkv, T, D)
            # queries and keys rotate together: one RoPE instead of two
            qk = self._rotate(qkv[:, :num_qk], cos, signed_sin)  # (1, H + Hkv, T, D)
            k_layer[:, :, start:end] = qk[:, self.num_heads :]  # (1, Hkv, T, D)
            v_layer[:, :, start:end] = qkv[:, num_qk:]
            attn = F.scaled_dot_product_attention(
                qk[:, : self.num_heads],
                k_layer[:, :, :end],
                v_layer[:, :, :end],
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=gqa,
            )  # (1, H, T, D)
            x = mm_o_add(attn.transpose(1, 2).reshape(num_new, self.q_size), w_o, x)  # x + attn W_o^T
            gate, up = mm_gate_up(self._rms_norm(x, norm2), w_gate_up).split(self.intermediate, dim=-1)
            x = mm_down_add(F.silu(gate) * up, w_down, x)  # (T, E)
        if num_logits == 0:
            return x.new_empty((0, self.vocab_size))
        mm_head = self._head_kernels[kernels.bucket_index(num_logits)]
        return mm_head(self._rms_norm(x[num_new - num_logits :], self.final_norm), self.lm_head)  # (N, V)

    def kernel_report(self) -> list[dict]:
        """Per weight: its shape, the layout it is stored in, the kernel each bucket of token
        counts runs, and the times that choice was made from (ms; none when forced)."""
        return [
            {
                "weight": name,
                "shape": list(shape),
                "layout": choice.layout,
                "kernels": dict(zip(kernels.BUCKETS, choice.kernels)),
                "forced": choice.forced,
                "expected_ms": choice.expected_ms(),
                "times_ms": choice.times_ms,
            }
            for name, choice, shape in ((name, self.choices[name], self.shapes[name]) for name in self.choices)
        ]


def _rope_tables(config, head_dim: int, max_positions: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (P, D) as transformers computes them: float32 frequencies, cast to the
    model dtype; the sin's first half negated (``LlamaRunner._rotate``)."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (P, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (P, D)
    cos = angles.cos().to(device=device, dtype=dtype)
    sin = angles.sin().to(device=device, dtype=dtype)
    half = head_dim // 2
    return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def _store(model: torch.nn.Module, names: list[str], layout: str) -> torch.Tensor:
    """The weights ``names`` as one matrix (projections concatenated: one matmul instead of
    several) in ``layout``, held once: the module's parameters become views into it (a
    transposed copy's ``.t()`` still reads as (out, in)); a packed matrix cannot be viewed, so
    their storage is released instead (``own_weights``)."""
    params = [model.get_parameter(name) for name in names]
    plain = torch.cat([p.detach() for p in params]) if len(params) > 1 else params[0].detach()  # (out, in)
    stored = kernels.to_layout(plain, layout)
    offset = 0
    for param in params:
        rows = param.shape[0]
        if layout == "plain":
            param.data = stored[offset : offset + rows]
        elif layout == "transposed":
            param.data = stored[:, offset : offset + rows].t()
        else:
            param.data = param.data.new_empty(0)
        offset += rows
    return stored


def _weights_moved(module, args):
    raise RuntimeError(
        "this model's weights were packed into csdrafting's lean runner (own_weights=True) and "
        "it cannot run by itself any more; load another copy to run it with transformers"
    )
