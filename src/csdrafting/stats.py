"""Counters kept during a generation and the metrics derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReviewCounters:
    """What one level saw as a reviewer: drafts checked, tokens accepted, by position and origin."""

    reviews: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_origin: dict[str, int] = field(default_factory=dict)
    accepted_by_origin: dict[str, int] = field(default_factory=dict)
    # origin -> per draft position counts: acceptance of each proposer's tokens by position
    drafted_by_origin_position: dict[str, list[int]] = field(default_factory=dict)
    accepted_by_origin_position: dict[str, list[int]] = field(default_factory=dict)

    def record(self, origins: list[str], num_accepted: int) -> None:
        num_draft = len(origins)
        self.reviews += 1
        self.drafted += num_draft
        self.accepted += num_accepted
        grow = num_draft - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position.extend([0] * grow)
            self.accepted_by_position.extend([0] * grow)
        for i, origin in enumerate(origins):
            self.drafted_by_position[i] += 1
            self.drafted_by_origin[origin] = self.drafted_by_origin.get(origin, 0) + 1
            drafted_here = self.drafted_by_origin_position.setdefault(origin, [])
            accepted_here = self.accepted_by_origin_position.setdefault(origin, [])
            if len(drafted_here) <= i:
                drafted_here.extend([0] * (i + 1 - len(drafted_here)))
                accepted_here.extend([0] * (i + 1 - len(accepted_here)))
            drafted_here[i] += 1
            if i < num_accepted:
                self.accepted_by_position[i] += 1
                self.accepted_by_origin[origin] = self.accepted_by_origin.get(origin, 0) + 1
                accepted_here[i] += 1

    def as_dict(self) -> dict:
        return {
            "reviews": self.reviews,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            # mean tokens emitted per review, counting the recovered / bonus token
            "mean_acceptance_length": (self.accepted + self.reviews) / self.reviews if self.reviews else None,
            "drafted_by_position": list(self.drafted_by_position),
            "accepted_by_position": list(self.accepted_by_position),
            "acceptance_by_position": [
                a / d if d else None for a, d in zip(self.accepted_by_position, self.drafted_by_position)
            ],
            "drafted_by_origin": dict(self.drafted_by_origin),
            "accepted_by_origin": dict(self.accepted_by_origin),
            "drafted_by_origin_position": {k: list(v) for k, v in self.drafted_by_origin_position.items()},
            "accepted_by_origin_position": {k: list(v) for k, v in self.accepted_by_origin_position.items()},
        }


@dataclass(frozen=True)
class GenerationStats:
    """Returned with every generation. ``levels`` holds one dict per level, target first:
    name, kind, forward_calls (propose calls for MaG), tokens_run, emitted (output tokens this
    level proposed first) and, for reviewers, ``review`` (a ``ReviewCounters`` dict)."""

    num_prompt_tokens: int
    num_new_tokens: int
    target_steps: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str
    levels: list[dict]

    @property
    def mean_acceptance_length(self) -> float:
        """New tokens per target forward after the prefill (1.0 for plain decoding)."""
        return self.num_new_tokens / self.target_steps if self.target_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding (prefill excluded)."""
        return self.num_new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of draft tokens the target accepted."""
        review = self.levels[0].get("review") if self.levels else None
        return review["acceptance_rate"] if review else None

    def as_dict(self) -> dict:
        return {
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_new_tokens": self.num_new_tokens,
            "target_steps": self.target_steps,
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_rate": self.acceptance_rate,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "finish_reason": self.finish_reason,
            "levels": self.levels,
        }
