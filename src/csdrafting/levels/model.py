"""Neural levels over transformers models (torch backend).

Two runners compute the forward passes: the lean ``LlamaRunner`` (``lean_llama.py``) for Llama
weights, and ``TransformersRunner`` (the model's own forward with a ``DynamicCache``) for any
other causal LM. ``model_level`` wraps the chosen runner in a ``PrefixMemoLevel``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import tree_layout
from .lean_llama import LlamaRunner
from .lean_llama import supports as lean_supports
from .memo import PrefixMemoLevel


class TransformersRunner:
    """Forward passes through a transformers model and its ``DynamicCache``: works for any
    architecture whose cache can be cropped."""

    runner_name = "transformers"

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.model = model
        self._new_cache = lambda: DynamicCache(config=model.config)
        self.cache = self._new_cache()
        self.length = 0
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.config.vocab_size)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", 1 << 30
        )

    @torch.inference_mode()
    def forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        if start < self.length:
            self.cache.crop(start - self.length)  # negative: drop that many trailing positions
        elif start > self.length:
            raise RuntimeError(f"cache holds {self.length} positions, cannot start at {start}")
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(token_ids), device=self.device)
        out = self.model(
            input_ids=input_ids.unsqueeze(0),
            cache=self.cache,
            use_cache=True,
            position_ids=positions.unsqueeze(0),
            logits_to_keep=max(num_logits, 1),
        )
        self.length = start + len(token_ids)
        return out.logits[0, out.logits.shape[1] - num_logits :]  # (N, V)

    @torch.inference_mode()
    def forward_tree(self, token_ids: list[int], parents: list[int], start: int, num_logits: int) -> torch.Tensor:
        """A tree of tokens in one forward (``LlamaRunner.forward_tree``): a custom 4-D float
        mask (transformers passes a 4-D mask through as it is) and position ids start + depth."""
        if start < self.length:
            self.cache.crop(start - self.length)
        elif start > self.length:
            raise RuntimeError(f"cache holds {self.length} positions, cannot start at {start}")
        num_new = len(token_ids)
        depths, block = tree_layout(parents, self.device)  # (T,), (T, T)
        mask = torch.zeros((1, 1, num_new, start + num_new), device=self.device, dtype=self.dtype)  # (1, 1, T, S)
        mask[..., start:].masked_fill_(~block, torch.finfo(self.dtype).min)
        positions = depths + start  # (T,)
        out = self.model(
            input_ids=torch.tensor([token_ids], dtype=torch.long, device=self.device),
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            position_ids=positions.unsqueeze(0),
            logits_to_keep=max(num_logits, 1),
        )
        self.length = start + num_new
        return out.logits[0, out.logits.shape[1] - num_logits :]  # (N, V)

    @torch.inference_mode()
    def keep(self, base: int, slots: list[int]) -> None:
        """Keep the cache entries at ``base + slots[j]`` as positions ``base + j``; drop the rest."""
        index = torch.cat(
            [torch.arange(base, device=self.device), torch.tensor(slots, dtype=torch.long, device=self.device) + base]
        )
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self.length = base + len(slots)


def make_runner(model: torch.nn.Module, runner: str = "auto", own_weights: bool = False, kernel: str = "auto"):
    """The lean runner where it computes the model exactly, else transformers' forward.
    ``own_weights``: the caller hands the module over (loaded for this level alone), so the lean
    runner may re-lay its weights out in a form the module cannot run (``LlamaRunner``).
    ``kernel``: the lean runner's matmul kernel (``CascadeConfig.kernel``)."""
    if runner not in ("auto", "lean", "transformers"):
        raise ConfigError(f"runner must be 'auto', 'lean' or 'transformers', got {runner!r}")
    use_lean = runner == "lean" or (runner == "auto" and lean_supports(model.config))
    return LlamaRunner(model, kernel, own_weights) if use_lean else TransformersRunner(model)


def model_level(
    name: str, model: torch.nn.Module, runner: str = "auto", own_weights: bool = False, kernel: str = "auto"
) -> PrefixMemoLevel:
    """A transformers causal LM as a neural level of the cascade."""
    return PrefixMemoLevel(name, make_runner(model, runner, own_weights, kernel))
