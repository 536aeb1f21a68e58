"""What one benchmarked generation is asked (``Request``) and what it returns (``Outcome``): the
types every method runner of the bench shares (``runner.py``, ``llamacpp_peers.py``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    greedy: bool
    fixed_length: bool  # EOS ignored: exactly max_new_tokens tokens
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int


@dataclass
class Outcome:
    token_ids: list[int]
    finish_reason: str
    prefill_seconds: float | None
    decode_seconds: float | None
    levels: list[dict]  # name, kind, num_forwards, num_params (+ our per-level statistics)
    tokens_per_target_step: float | None
    acceptance_rate: float | None
    config: dict
    engine_stats: dict | None = None
    memory: dict | None = None  # a peer in its own process: its peak RSS (else the bench measures its own)

    @classmethod
    def of_peer(
        cls, tokens: list[int], finish: str, prefill: float | None, wall: float, levels: list[dict], config: dict
    ) -> Outcome:
        """A peer's generation, timed from outside: the prefill ends at the first new token and
        each target forward counts as a step (peers report no acceptance)."""
        target_calls = levels[0]["num_forwards"]
        return cls(
            token_ids=tokens,
            finish_reason=finish,
            prefill_seconds=prefill,
            decode_seconds=wall - prefill if prefill is not None else None,
            levels=levels,
            tokens_per_target_step=len(tokens) / target_calls if target_calls else None,
            acceptance_rate=None,
            config=config,
        )
