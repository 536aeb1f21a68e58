"""One cascade step: build a draft through the cascade, have the target verify it.

Levels are indexed ``0`` (target), ``1 .. m`` (neural drafters, largest first) and ``m + 1``
(MaG, when on). Drafter level ``c`` is column ``c - 1`` of the K-matrix and, as a reviewer, row ``c``.

The step walks the K-matrix (see ``kmatrix.py``):
1. ``_fill(0)``: the target's draft is filled left to right by the drafters of row 0 (horizontal).
2. A neural drafter contributes tokens by reviewing a draft filled, recursively, by the levels
   below it (``_fill(c)``; vertical) and appending its accepted prefix plus its own next token.
   MaG contributes tokens by proposing them directly.
3. The target runs the whole draft in one forward and verifies it exactly (lenience 1).

With ``tree_budget`` set, step 3 may verify a token tree instead of the chain: the chain plus the
candidates ``TreeSizer`` finds worth their cost (``tree.py``; it says why only the target
verifies trees). Where none is, the chain is verified as a chain.

A step steers nothing itself: it returns a ``StepReport`` (``report.py``) of what it did, and its
observers (the statistics, the schedule, the tree sizer) learn from that one report.

In sampling mode every draft token travels with the distribution it was drawn from (a point mass
for MaG, the induced law ``pi`` of ``verify.py`` for a neural reviewer's tokens) because the
next review's acceptance test is exact only against that distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import verify
from .levels.base import MAG as MAG_KIND
from .levels.base import NeuralLevel
from .levels.mag import MaG
from .report import ForwardRecord, ReviewRecord, Segment, StepObserver, StepReport, TreeOutcome
from .sampling import SamplingParams, warp
from .schedule import ScheduleParams, StaticSchedule
from .stats import LevelStats, ReviewCounters, TreeCounters
from .tree import Branch, DraftTree, TreeParams, TreeSizer, confidence_bucket, length_bucket


@dataclass(frozen=True)
class EngineParams:
    """The engine's tuning constants and clock, passed in (tests pass their own): the schedule's
    (``schedule.ScheduleParams``), the tree sizer's (``tree.TreeParams``), and the clock every
    step and forward is timed with."""

    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    tree: TreeParams = field(default_factory=TreeParams)
    clock: Callable[[], float] = time.perf_counter


class Draft:
    """Draft tokens, the level each was first proposed by, and (sampling) the law it follows."""

    __slots__ = ("tokens", "origins", "probs", "segments", "second_choices")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.origins: list[int] = []
        self.probs: list[torch.Tensor | None] = []  # (V,) per token; None = point mass
        self.segments: list[Segment] = []  # which K-matrix column filled which positions
        # trees only: per token, the proposing drafter's best other choice at that position and how
        # sure it was of its first (tree.confidence_bucket), None for MaG's tokens; deterministic
        # given the drafted tokens, so a point mass in a tree
        self.second_choices: list[tuple[int, int] | None] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def add(
        self,
        tokens: list[int],
        origins: list[int],
        probs: list[torch.Tensor | None],
        second_choices: list[tuple[int, int] | None] | None = None,
    ) -> None:
        self.tokens.extend(tokens)
        self.origins.extend(origins)
        self.probs.extend(probs)
        self.second_choices.extend(second_choices if second_choices is not None else [None] * len(tokens))

    def cut(self, length: int) -> None:
        del self.tokens[length:], self.origins[length:], self.probs[length:], self.second_choices[length:]
        self.segments = [(c, start, min(end, length)) for c, start, end in self.segments if start < length]


class StepTally:
    """Per-generation statistics from step reports: every reviewer's counters (by draft position
    and proposing level) and, for tree configurations, the tree counters."""

    def __init__(self, names: list[str], trees: bool) -> None:
        self.names = names
        self.reviews = [ReviewCounters() for _ in names]
        self.trees = TreeCounters() if trees else None

    def observe(self, report: StepReport) -> None:
        outcome = report.tree
        tree_verified = outcome is not None and outcome.tree is not None
        for review in report.reviews:
            if review.origins and not (review.reviewer == 0 and tree_verified):
                self.reviews[review.reviewer].record([self.names[o] for o in review.origins], review.num_accepted)
        if outcome is None or self.trees is None:
            return
        if outcome.tree is None:  # no candidate paid for a tree: the chain went as a chain
            num_chain, num_accepted = len(outcome.chain_origins), outcome.num_chain_accepted
            self.trees.num_unbranched += 1
            self.trees.record(num_chain, num_chain, num_accepted, num_accepted)
            return
        # the target's review counters see the line it followed: the path, then the child it rejected
        if outcome.line_origins:
            self.reviews[0].record([self.names[o] for o in outcome.line_origins], len(outcome.path))
        tree = outcome.tree
        self.trees.record(len(tree), tree.num_chain, len(outcome.path), outcome.num_chain_accepted, outcome.won_by)


class CascadeStep:
    """The draft-review-verify machinery over one set of levels. Holds no sequence of its own:
    each call gets the committed token ids; the levels' caches memoise what they have run.

    ``levels``: target, neural drafters (largest first), then MaG if on. ``schedule`` decides
    every draft length (the K-matrix's and MaG first's); ``lenience`` is how drafters review.
    ``tree_sizer`` (its own, unless one is passed to keep what an earlier step object learned)
    chooses tree candidates when ``tree_budget`` is set."""

    def __init__(
        self,
        levels: list[NeuralLevel | MaG],
        schedule: StaticSchedule,
        lenience: float,
        eos_ids: frozenset[int],
        tree_budget: int | None = None,
        tree_sizer: TreeSizer | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.levels = levels
        self.tree_budget = tree_budget  # max nodes of the target's draft tree; None: chains
        self.tree_sizer = tree_sizer if tree_sizer is not None else TreeSizer()
        self.schedule = schedule
        self.lenience = lenience
        self.eos_ids = eos_ids
        self.clock = clock
        self.names = [level.name for level in levels]
        self.mag_index = len(levels) - 1 if levels[-1].kind == MAG_KIND else None
        self.begin(SamplingParams(), None, stop_at_eos=False)

    def begin(self, params: SamplingParams, generator: torch.Generator | None, stop_at_eos: bool) -> None:
        """Reset every level and counter for a new generation."""
        self.params = params
        self.generator = generator
        self.stop_at_eos = stop_at_eos
        self.num_committed = 0
        # what the schedule learned carries over (a useless drafter stays off): it changes the
        # speed of later generations, never their output; seeded sampling must be reproducible
        self.schedule.begin(carry_over=params.greedy or params.seed is None)
        for level in self.levels:
            level.reset()
        self.tally = StepTally(self.names, trees=bool(self.tree_budget))
        self.tree_sizer.begin(use_timing=params.greedy or params.seed is None)
        self.observers: tuple[StepObserver, ...] = (self.tally, self.schedule, self.tree_sizer)
        self._one_hot_cache: dict[int, torch.Tensor] = {}

    def prefill(self, prompt_ids: list[int]) -> None:
        """Cache the prompt (all but its last token, which the first step runs) in every level."""
        self.num_committed = len(prompt_ids)
        for level in self.levels:
            if level.kind == MAG_KIND:
                level.observe(prompt_ids, len(prompt_ids))  # builds MaG's index
            else:
                level.prefill(prompt_ids[:-1])

    def step(self, ids: list[int], max_tokens: int) -> StepReport:
        """Emit between 1 and ``max_tokens`` new tokens after the committed ``ids``: the report's
        ``tokens`` and, for each, the level that first proposed it (0 = the target itself). Every
        observer learns from the report before it is returned."""
        started = self.clock()
        self.num_committed = len(ids)
        report = StepReport(speculative=self.schedule.speculate())
        limit = max_tokens - 1
        # a tree needs MaG (its candidates) and a budget; the drafters then also note their second choices
        may_branch = bool(report.speculative and self.tree_budget and self.mag_index is not None)
        draft = Draft()
        if report.speculative:
            gated = self._mag_first(ids, limit)
            report.mag_first = bool(gated)
            draft = gated if gated else self._fill(0, ids, limit, report, may_branch)
        report.num_drafted = len(draft)
        tree = self._grow_tree(ids, draft, limit) if may_branch else None
        if tree is not None:
            self._verify_tree(ids, tree, draft, report)
        else:
            outcome, _ = self._review(0, ids, draft, 1.0, report)
            report.num_accepted = outcome.num_accepted
            report.tokens = draft.tokens[: outcome.num_accepted] + [outcome.next_token]
            report.origins = draft.origins[: outcome.num_accepted] + [0]
            if may_branch:
                report.tree = TreeOutcome(None, tuple(draft.origins), num_chain_accepted=outcome.num_accepted)
        # the verification read its result back to the host (.tolist()): the clock is synchronised
        report.seconds = self.clock() - started
        for observer in self.observers:
            observer.observe(report)
        return report

    def _verify_tree(self, ids: list[int], tree: DraftTree, draft: Draft, report: StepReport) -> None:
        """The target verifies ``tree`` (the chain ``draft`` and its alternatives) in one forward;
        fills ``report``'s tokens and tree outcome (its ``num_accepted``: the chain's accepted
        tokens, what the schedule learns from, as for a chain)."""
        target = self.levels[0]
        started, tokens_before = self.clock(), target.counters.num_tokens_run
        logits = target.tree_logits(ids, tree.tokens, tree.parents)  # (N + 1, V)
        if self.params.greedy:
            outcome = verify.verify_tree_greedy(logits, tree.tokens, tree.parents)
        else:
            probs = warp(logits, self.params)  # (N + 1, V)
            outcome = verify.verify_tree_sampled(probs, tree.tokens, tree.parents, tree.laws, self.generator)
        path = outcome.path
        target.commit_path(path)
        # the verification read its result back to the host: the clock is synchronised
        num_run, seconds = target.counters.num_tokens_run - tokens_before, self.clock() - started
        report.forwards.append(ForwardRecord(0, num_run, seconds, tree=True))
        num_chain_accepted = tree.chain_prefix(path)
        report.reviews.append(ReviewRecord(0, tuple(draft.origins), tuple(draft.segments), num_chain_accepted))
        children = verify.tree_children(tree.parents)[path[-1] + 1 if path else 0]
        line = path + children[:1]  # the path, then the child it rejected
        won = tree.kinds[path[num_chain_accepted]][0] if num_chain_accepted < len(path) else None
        report.tree = TreeOutcome(
            tree,
            tuple(draft.origins),
            path=tuple(path),
            num_chain_accepted=num_chain_accepted,
            line_origins=tuple(tree.origins[n] for n in line),
            won_by=won,
            extra_seconds=self.tree_sizer.extra_seconds(len(tree) - tree.num_chain),
        )
        report.num_accepted = num_chain_accepted
        report.tokens = [tree.tokens[n] for n in path] + [outcome.next_token]
        report.origins = [tree.origins[n] for n in path] + [0]

    def _grow_tree(self, ids: list[int], draft: Draft, limit: int) -> DraftTree | None:
        """The chain and the candidates ``TreeSizer`` finds worth their cost: the drafters' second
        choices beside the chain's tokens, MaG's continuation of the chain, and MaG's
        alternatives at the root and under the first ``alt_depths`` chain nodes (as deep as the
        chain below them, at least 2 tokens). Never past an EOS when stopping there, nor past
        ``limit`` (the tree's depth limit). None: the chain alone (nothing paid, or no room)."""
        # node i's keys and values sit in slot len(ids) + i: a tree never outgrows the context
        # (the chain always fits: the request was checked against the context)
        max_nodes = min(self.tree_budget, self.levels[0].max_positions - len(ids))
        if limit <= 0 or len(draft) >= max_nodes:
            return None  # no room for anything beyond the chain
        tree = DraftTree(max_nodes=max_nodes, max_depth=limit)
        tree.add_chain(draft.tokens, draft.origins, draft.probs)
        stop_ids = self.eos_ids if self.stop_at_eos else frozenset()
        reached = next((i + 1 for i, token in enumerate(draft.tokens) if token in stop_ids), len(draft))
        mag = self.levels[self.mag_index]
        params = self.tree_sizer.params

        def after_second(depth: int, token: int) -> Callable[[], list[int]]:
            """MaG's continuation of the second choice ``token`` at ``depth`` (asked for if wanted)."""
            context = ids + draft.tokens[:depth] + [token]
            return lambda: mag.propose(context, self.num_committed, max(1, len(draft) - depth - 1)).tokens

        branches = []
        for depth, second in enumerate(draft.second_choices[:reached]):
            if second is not None:
                token, bucket = second
                more = after_second(depth, token)
                branches.append(Branch(depth - 1, [token], draft.origins[depth], "second", bucket, more))

        def extension() -> list[Branch]:
            if reached < len(draft) or len(draft) >= limit:
                return []  # the chain ends in an EOS, or at the depth limit
            tokens = mag.propose(ids + draft.tokens, self.num_committed, min(params.extend, limit - len(draft))).tokens
            return [Branch(len(draft) - 1, tokens, self.mag_index, "extend", length_bucket(len(draft)))]

        def alternatives(depth: int) -> list[Branch]:
            # at the root the chain may itself be MaG's longest match: it is merged, not repeated
            context, length = ids + draft.tokens[:depth], max(2, len(draft) - depth)
            proposals = mag.propose_many(context, self.num_committed, length, params.max_rank)
            return [Branch(depth - 1, tokens, self.mag_index, "mag", rank) for rank, tokens in enumerate(proposals)]

        num_depths = min(reached, params.alt_depths) + 1
        return self.tree_sizer.grow(tree, branches, extension, alternatives, num_depths, stop_ids)

    def _mag_first(self, ids: list[int], limit: int) -> Draft | None:
        """MaG's draft for the target when its match is long enough to trust, else None. The
        decision depends only on the committed tokens, so it cannot bias the verification."""
        if self.schedule.mag_first is None or self.mag_index is None or limit <= 0:
            return None
        mag = self.levels[self.mag_index]
        proposal = mag.propose(ids, self.num_committed, min(self.schedule.mag_first_length(), limit))
        # (a shorter proposal is a prefix of a longer one: the schedule may keep only part of it)
        num = self.schedule.mag_first_tokens_for(proposal.match_length, len(proposal.tokens))
        if num == 0:
            return None
        draft = Draft()
        draft.add(proposal.tokens[:num], [self.mag_index] * num, [None] * num)
        if self.stop_at_eos:
            self._cut_after_eos(draft)
        return draft

    def _fill(self, reviewer: int, context: list[int], limit: int, report: StepReport, branching: bool) -> Draft:
        """The draft that level ``reviewer`` will review after ``context``: at most ``limit`` tokens,
        filled by the drafters of row ``reviewer`` of the K-matrix, larger drafters first.
        ``branching``: the drafters note their second choices (a step that may verify a tree)."""
        draft = Draft()
        if reviewer >= self.schedule.size or limit <= 0:
            return draft  # no drafters below: the reviewer decodes autoregressively
        ends = self.schedule.ends(reviewer)
        for column in range(reviewer, self.schedule.size):
            goal = min(ends[column], limit)
            start = len(draft)
            while len(draft) < goal:
                room = limit - len(draft)
                self._extend(column + 1, context + draft.tokens, draft, goal - len(draft), room, report, branching)
                if self.stop_at_eos and self._cut_after_eos(draft):
                    break
            if len(draft) > start:
                draft.segments.append((column, start, len(draft)))
            if self.stop_at_eos and draft.tokens and draft.tokens[-1] in self.eos_ids:
                return draft  # positions after an EOS can never be emitted
        return draft

    def _extend(
        self,
        level_index: int,
        context: list[int],
        draft: Draft,
        need: int,
        room: int,
        report: StepReport,
        branching: bool,
    ) -> None:
        """Append at least one token (at most ``room``) from level ``level_index`` to ``draft``."""
        level = self.levels[level_index]
        if level.kind == MAG_KIND:
            tokens = level.propose(context, self.num_committed, need).tokens
            draft.add(tokens, [level_index] * need, [None] * need)
            return
        sub = self._fill(level_index, context, room - 1, report, branching)  # room - 1: space for its own token
        outcome, logits = self._review(level_index, context, sub, self.lenience, report)
        num_accepted = outcome.num_accepted
        probs = list(outcome.token_probs) if outcome.token_probs is not None else [None] * (num_accepted + 1)
        tokens = sub.tokens[:num_accepted] + [outcome.next_token]
        second_choices = None
        if branching:
            values, indices = logits[: num_accepted + 1].topk(2, dim=-1)  # (n, 2)
            gaps = (values[:, 0] - values[:, 1]).tolist()
            second_choices = [
                (b if a == token else a, confidence_bucket(gap))
                for token, (a, b), gap in zip(tokens, indices.tolist(), gaps)
            ]
        draft.add(tokens, sub.origins[:num_accepted] + [level_index], probs, second_choices)

    def _review(
        self, level_index: int, context: list[int], draft: Draft, lenience: float, report: StepReport
    ) -> tuple[verify.ReviewOutcome, torch.Tensor]:
        """One forward of a neural level over ``context + draft`` and the accept / reject of the
        draft, both written into ``report``."""
        level = self.levels[level_index]
        started, tokens_before = self.clock(), level.counters.num_tokens_run
        logits = level.next_token_logits(context + draft.tokens, len(draft) + 1)  # (K + 1, V)
        if self.params.greedy:
            outcome = verify.review_greedy(logits, draft.tokens, lenience)
        else:
            probs = warp(logits, self.params)  # (K + 1, V)
            draft_probs = self._stack_probs(draft, probs) if len(draft) else None
            outcome = verify.review_sampled(probs, draft.tokens, draft_probs, self.generator, lenience)
        # the review read its result back to the host: the clock is synchronised
        num_run, seconds = level.counters.num_tokens_run - tokens_before, self.clock() - started
        report.forwards.append(ForwardRecord(level_index, num_run, seconds))
        report.reviews.append(
            ReviewRecord(level_index, tuple(draft.origins), tuple(draft.segments), outcome.num_accepted)
        )
        return outcome, logits

    def _stack_probs(self, draft: Draft, like: torch.Tensor) -> torch.Tensor:
        """(K, V) draft laws; point masses (MaG) become one-hot rows."""
        rows = []
        for token, row in zip(draft.tokens, draft.probs):
            if row is None:
                row = self._one_hot_cache.get(token)
                if row is None:
                    row = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
                    row[token] = 1
                    self._one_hot_cache[token] = row
            rows.append(row.to(like.dtype))
        return torch.stack(rows)

    def _cut_after_eos(self, draft: Draft) -> bool:
        for i, token in enumerate(draft.tokens):
            if token in self.eos_ids:
                draft.cut(i + 1)
                return True
        return False

    def level_stats(self, emitted: list[int]) -> tuple[LevelStats, ...]:
        """Per-level statistics; ``emitted[i]``: output tokens level i proposed first."""
        out = []
        for i, level in enumerate(self.levels):
            kind = "target" if i == 0 else ("mag" if level.kind == MAG_KIND else "drafter")
            counters = level.counters
            out.append(
                LevelStats(
                    name=level.name,
                    kind=kind,
                    num_emitted=emitted[i],
                    num_forwards=counters.num_forwards,
                    num_tokens_run=counters.num_tokens_run,
                    num_params=level.num_params,
                    runner=level.runner_name,
                    review=self.tally.reviews[i] if kind != "mag" else None,
                    tree=self.tally.trees if i == 0 else None,
                )
            )
        return tuple(out)
