"""A lean runner for Llama-architecture weights: preallocated KV cache, rollback by position.

Why it exists: on small models the framework's per-forward overhead, not the arithmetic, decides
the speed (a 22M-parameter model does ~45 MFLOP per token, well under a millisecond of compute).
This runner does the same math as transformers' ``LlamaForCausalLM`` in as few tensor ops as
possible: fused QKV and gate/up projections, a KV buffer indexed by position (so "rolling back"
rejected tokens is free: the next forward simply writes over them) and logits only for the
positions the caller asks for.

Shapes: T new tokens, S = start + T keys, H heads, Hkv key/value heads, D head dim, E hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


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

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        if not supports(config):
            raise ConfigError(
                "the lean runner computes plain Llama models only (default RoPE, no biases, SiLU); "
                "use runner 'auto' or 'transformers' for this model"
            )
        self.num_params = sum(p.numel() for p in model.parameters())
        self.vocab_size = int(config.vocab_size)
        weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        self.device = weights["model.embed_tokens.weight"].device
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        self.embed = weights["model.embed_tokens.weight"]  # (V, E)
        self.lm_head = weights.get("lm_head.weight", self.embed)  # (V, E); tied when absent
        self.final_norm = weights["model.norm.weight"]
        self.layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            w = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            self.layers.append(
                (
                    w["input_layernorm.weight"],
                    _fuse(
                        model, prefix, ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
                    ),
                    w["self_attn.o_proj.weight"],
                    w["post_attention_layernorm.weight"],
                    _fuse(model, prefix, ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
                    w["mlp.down_proj.weight"],
                )
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.intermediate = self.layers[0][5].shape[1]
        # RoPE tables as transformers computes them: float32 frequencies, cast to the model dtype
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (P, D/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (P, D)
        self.cos = angles.cos().to(device=self.device, dtype=self.dtype)
        sin = angles.sin().to(device=self.device, dtype=self.dtype)
        half = self.head_dim // 2
        self.signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # (P, D)
        self.capacity = 0
        self.k_cache: torch.Tensor | None = None  # (L, Hkv, capacity, D)
        self.v_cache: torch.Tensor | None = None

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
        rotate_half's negated half folded into the sin table (exact: a sign flip does not round)."""
        half = x.shape[-1] // 2
        return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin

    @torch.inference_mode()
    def forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        """Run ``token_ids`` (T) at positions start..start+T-1; return logits (num_logits, V)
        for the last ``num_logits`` of them. KV entries at positions >= start are overwritten.
        """
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)  # (T,)
        num_new = input_ids.shape[0]
        end = start + num_new
        self._reserve(end)
        x = self.embed[input_ids]  # (T, E)
        cos = self.cos[start:end].unsqueeze(0)  # (1, T, D)
        signed_sin = self.signed_sin[start:end].unsqueeze(0)
        # One query attends to every cached key; a whole prompt is plain causal attention. Other
        # multi-token forwards need a mask: additive (0 / -inf), built once here, because SDPA
        # would otherwise convert a boolean mask in every layer (same bits either way).
        mask, causal = None, num_new > 1 and start == 0
        if num_new > 1 and not causal:
            query_pos = torch.arange(start, end, device=self.device).unsqueeze(-1)  # (T, 1)
            hidden = torch.arange(end, device=self.device).unsqueeze(0) > query_pos  # (T, S)
            mask = torch.zeros(hidden.shape, device=self.device, dtype=self.dtype).masked_fill_(hidden, float("-inf"))
        gqa = self.num_kv_heads != self.num_heads
        for i, (norm1, w_qkv, w_o, norm2, w_gate_up, w_down) in enumerate(self.layers):
            h = self._rms_norm(x, norm1)
            qkv = F.linear(h, w_qkv)  # (T, (H + 2 Hkv) D)
            # queries and keys rotate together: one RoPE instead of two
            qk = qkv[:, : self.q_size + self.kv_size].view(num_new, self.num_heads + self.num_kv_heads, self.head_dim)
            qk = self._rotate(qk.transpose(0, 1), cos, signed_sin)  # (H + Hkv, T, D)
            q = qk[: self.num_heads]  # (H, T, D)
            v = qkv[:, self.q_size + self.kv_size :].view(num_new, self.num_kv_heads, self.head_dim)
            self.k_cache[i, :, start:end] = qk[self.num_heads :]  # (Hkv, T, D)
            self.v_cache[i, :, start:end] = v.transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                self.k_cache[i, :, :end].unsqueeze(0),
                self.v_cache[i, :, :end].unsqueeze(0),
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=gqa,
            )  # (1, H, T, D)
            x = x + F.linear(attn[0].transpose(0, 1).reshape(num_new, self.q_size), w_o)
            gate, up = F.linear(self._rms_norm(x, norm2), w_gate_up).split(self.intermediate, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        if num_logits == 0:
            return x.new_empty((0, self.lm_head.shape[0]))
        return F.linear(self._rms_norm(x[num_new - num_logits :], self.final_norm), self.lm_head)  # (N, V)


def _fuse(model: torch.nn.Module, prefix: str, names: list[str]) -> torch.Tensor:
    """Concatenate projection weights into one matrix (one matmul instead of several) and make the
    transformers model's parameters views into it, so the weights are held in memory once."""
    params = [model.get_parameter(prefix + name) for name in names]
    fused = torch.cat([p.detach() for p in params])
    offset = 0
    for param in params:
        rows = param.shape[0]
        param.data = fused[offset : offset + rows]
        offset += rows
    return fused
