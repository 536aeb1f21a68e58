"""``StepReport``: everything one cascade step did, told once to whatever learns from it.

A step (``step.py``) drafts, reviews and verifies; it does not steer itself. What steers it —
the adaptive schedule (draft lengths, the speculation switch), the tree sizer (which candidates
pay) and the per-generation statistics — reads the step's report when the step is over, through
one call: ``observer.observe(report)`` (transformers' ``update_candidate_strategy``, llama.cpp's
``common_speculative_accept``). Level indices follow ``step.py``: 0 the target, then the neural
drafters largest first, then MaG.

Decisions inside a step read only what observers learned from earlier steps, so a step's own
reviews inform the next step, never the rest of the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

Segment = tuple[int, int, int]  # (K-matrix column, first draft position, end position) one drafter filled


@dataclass(frozen=True)
class ForwardRecord:
    """One forward of a neural level and the review (or tree verification) of its output."""

    level: int
    num_tokens: int  # positions the level ran (its cache may have held part of the input)
    seconds: float  # forward and review, read after the result reached the host
    tree: bool = False  # the target's forward over a token tree


@dataclass(frozen=True)
class ReviewRecord:
    """Level ``reviewer`` reviewed a draft: ``origins[i]`` proposed draft token ``i``;
    ``segments`` say which K-matrix column filled which positions; the first ``num_accepted``
    tokens were accepted."""

    reviewer: int
    origins: tuple[int, ...]
    segments: tuple[Segment, ...]
    num_accepted: int


@dataclass(frozen=True)
class TreeOutcome:
    """The target's verification of a token tree (``tree.DraftTree``), or of the chain alone in
    a step that could have verified a tree (``tree is None``: no candidate paid)."""

    tree: object | None  # the DraftTree verified; None: the chain went alone
    chain_origins: tuple[int, ...]  # the chain's tokens' proposing levels
    path: tuple[int, ...] = ()  # accepted tree nodes, root to leaf
    num_chain_accepted: int = 0  # accepted tokens of the chain (a chain step: all accepted ones)
    line_origins: tuple[int, ...] = ()  # proposers along the path and the first child it rejected
    won_by: str | None = None  # kind of the first accepted node off the chain, if any
    extra_seconds: float = 0.0  # what the sizer's fit says the tree cost beyond its chain's forward


@dataclass
class StepReport:
    """What one step emitted and how: the emitted ``tokens`` and the level that first proposed
    each (0: the target's own token), whether it ``speculative``-ly drafted at all, whether the
    draft came from MaG first (``mag_first``), every forward and review in the order they ran,
    the tree outcome of a tree-capable step, and the step's wall time."""

    tokens: list[int] = field(default_factory=list)
    origins: list[int] = field(default_factory=list)
    speculative: bool = False
    mag_first: bool = False
    num_drafted: int = 0  # draft tokens the target was given (a tree: the chain's)
    num_accepted: int = 0  # draft tokens the target accepted (a tree: the chain's)
    seconds: float = 0.0
    forwards: list[ForwardRecord] = field(default_factory=list)
    reviews: list[ReviewRecord] = field(default_factory=list)
    tree: TreeOutcome | None = None


class StepObserver(Protocol):
    """Anything that learns from finished steps."""

    def observe(self, report: StepReport) -> None: ...
