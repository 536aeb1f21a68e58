"""Counters kept during a generation and the metrics derived from them (vLLM's vocabulary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ReviewCounters:
    """What one level saw as a reviewer: drafts checked, tokens accepted, by position and origin."""

    num_reviews: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_origin: dict[str, int] = field(default_factory=dict)
    accepted_by_origin: dict[str, int] = field(default_factory=dict)
    # origin -> per draft position counts: acceptance of each proposer's tokens by position
    drafted_by_origin_position: dict[str, list[int]] = field(default_factory=dict)
    accepted_by_origin_position: dict[str, list[int]] = field(default_factory=dict)

    def record(self, origins: list[str], num_accepted: int) -> None:
        num_draft = len(origins)
        self.num_reviews += 1
        self.num_drafted += num_draft
        self.num_accepted += num_accepted
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

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted / self.num_drafted if self.num_drafted else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per review, counting the recovered or bonus token (vLLM's meaning)."""
        return (self.num_accepted + self.num_reviews) / self.num_reviews if self.num_reviews else None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["acceptance_rate"] = self.acceptance_rate
        data["mean_acceptance_length"] = self.mean_acceptance_length
        data["acceptance_by_position"] = [
            a / d if d else None for a, d in zip(self.accepted_by_position, self.drafted_by_position)
        ]
        return data


@dataclass
class TreeCounters:
    """The target's draft trees (``tree.py``): their sizes, accepted path lengths, and how often
    the accepted path left the chain (an alternative branch won)."""

    num_trees: int = 0
    num_nodes: int = 0
    num_chain_nodes: int = 0
    num_accepted: int = 0  # accepted path lengths, summed
    num_branch_wins: int = 0  # trees whose accepted path went beyond the chain's accepted prefix
    num_branch_tokens: int = 0  # accepted tokens that were not the chain's
    num_unbranched: int = 0  # steps where no candidate paid for a tree: the chain went alone (TreeSizer)
    wins: dict[str, int] = field(default_factory=dict)  # branch wins by source: second, mag, extend

    def record(
        self, num_nodes: int, num_chain: int, num_accepted: int, num_chain_accepted: int, won: str | None = None
    ) -> None:
        """One tree; ``won``: the source of the branch the accepted path left the chain for."""
        self.num_trees += 1
        self.num_nodes += num_nodes
        self.num_chain_nodes += num_chain
        self.num_accepted += num_accepted
        self.num_branch_wins += num_accepted > num_chain_accepted
        self.num_branch_tokens += num_accepted - num_chain_accepted
        if won is not None:
            self.wins[won] = self.wins.get(won, 0) + 1

    def as_dict(self) -> dict:
        data = asdict(self)
        data["mean_tree_size"] = self.num_nodes / self.num_trees if self.num_trees else None
        data["mean_accepted_path"] = self.num_accepted / self.num_trees if self.num_trees else None
        return data


@dataclass(frozen=True)
class LevelStats:
    """One level's share of a generation. ``kind``: "target", "drafter" or "mag"."""

    name: str
    kind: str
    num_emitted: int  # output tokens this level proposed first
    num_forwards: int  # forward passes with logits (MaG: proposals)
    num_tokens_run: int  # positions run through the model (0 for MaG)
    num_params: int
    runner: str
    review: ReviewCounters | None = None  # for reviewers (the target and neural drafters)
    tree: TreeCounters | None = None  # the target's, when it verified token trees

    def as_dict(self) -> dict:
        data = asdict(self)
        data["review"] = self.review.as_dict() if self.review is not None else None
        data["tree"] = self.tree.as_dict() if self.tree is not None else None
        return data


@dataclass(frozen=True)
class GenerationStats:
    """Returned with every generation; ``levels`` holds one ``LevelStats`` per level, target first."""

    num_prompt_tokens: int
    num_new_tokens: int
    num_target_steps: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str
    levels: tuple[LevelStats, ...]
    plan_seconds: float = 0.0  # after decoding: "auto" observing this generation and re-planning

    @property
    def tokens_per_target_step(self) -> float:
        """New tokens per target forward after the prefill (1.0 for plain decoding)."""
        return self.num_new_tokens / self.num_target_steps if self.num_target_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding (prefill excluded)."""
        return self.num_new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of draft tokens the target accepted."""
        review = self.levels[0].review if self.levels else None
        return review.acceptance_rate if review is not None else None

    def level(self, name: str) -> LevelStats:
        for entry in self.levels:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def as_dict(self) -> dict:
        return {
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_new_tokens": self.num_new_tokens,
            "num_target_steps": self.num_target_steps,
            "tokens_per_target_step": self.tokens_per_target_step,
            "acceptance_rate": self.acceptance_rate,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "finish_reason": self.finish_reason,
            "plan_seconds": self.plan_seconds,
            "levels": [entry.as_dict() for entry in self.levels],
        }
