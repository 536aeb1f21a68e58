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

In sampling mode every draft token travels with the distribution it was drawn from (a point mass
for MaG, the induced law ``pi`` of ``verify.py`` for a neural reviewer's tokens) because the
next review's acceptance test is exact only against that distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from . import verify
from .levels.base import MAG as MAG_KIND
from .levels.base import NeuralLevel
from .levels.mag import MaG
from .sampling import SamplingParams, warp
from .schedule import Segment, StaticSchedule
from .stats import LevelStats, ReviewCounters, TreeCounters
from .tree import Branch, DraftTree, TreeSizer, confidence_bucket, length_bucket


class Draft:
    """Draft tokens, the level each was first proposed by, and (sampling) the law it follows."""

    __slots__ = ("tokens", "origins", "probs", "segments", "seconds")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.origins: list[int] = []
        self.probs: list[torch.Tensor | None] = []  # (V,) per token; None = point mass
        self.segments: list[Segment] = []  # which K-matrix column filled which positions
        # trees only: per token, the proposing drafter's best other choice at that position and how
        # sure it was of its first (tree.confidence_bucket), None for MaG's tokens; deterministic
        # given the drafted tokens, so a point mass in a tree
        self.seconds: list[tuple[int, int] | None] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def add(
        self,
        tokens: list[int],
        origins: list[int],
        probs: list[torch.Tensor | None],
        seconds: list[tuple[int, int] | None] | None = None,
    ) -> None:
        self.tokens.extend(tokens)
        self.origins.extend(origins)
        self.probs.extend(probs)
        self.seconds.extend(seconds if seconds is not None else [None] * len(tokens))

    def cut(self, length: int) -> None:
        del self.tokens[length:], self.origins[length:], self.probs[length:], self.seconds[length:]
        self.segments = [(c, start, min(end, length)) for c, start, end in self.segments if start < length]


class CascadeStep:
    """The draft-review-verify machinery over one set of levels. Holds no sequence of its own:
    each call gets the committed token ids; the levels' caches memoise what they have run.

    ``levels``: target, neural drafters (largest first), then MaG if on. ``schedule`` decides
    every draft length (the K-matrix's and MaG first's); ``lenience`` is how drafters review."""

    def __init__(
        self,
        levels: list[NeuralLevel | MaG],
        schedule: StaticSchedule,
        lenience: float,
        eos_ids: frozenset[int],
        tree_budget: int | None = None,
    ) -> None:
        self.levels = levels
        self.tree_budget = tree_budget  # max nodes of the target's draft tree; None: chains
        self.tree_sizer = TreeSizer()  # which candidates are worth a node, and whether a tree pays
        self._tree_step = False  # whether the current step may verify a tree
        self.schedule = schedule
        self.lenience = lenience
        self.eos_ids = eos_ids
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
        self.reviews = [ReviewCounters() for _ in self.levels]
        self.tree_counters = TreeCounters() if self.tree_budget else None
        self.tree_sizer.begin(use_timing=params.greedy or params.seed is None)
        self._one_hot_cache: dict[int, torch.Tensor] = {}

    def prefill(self, prompt_ids: list[int]) -> None:
        """Cache the prompt (all but its last token, which the first step runs) in every level."""
        self.num_committed = len(prompt_ids)
        for level in self.levels:
            if level.kind == MAG_KIND:
                level.observe(prompt_ids, len(prompt_ids))  # builds MaG's index
            else:
                level.prefill(prompt_ids[:-1])

    def step(self, ids: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """Emit between 1 and ``max_tokens`` new tokens after the committed ``ids``; returns the
        tokens and, for each, the level that first proposed it (0 = the target itself)."""
        started = time.perf_counter()
        self.num_committed = len(ids)
        speculative = self.schedule.speculate()
        self._tree_step = bool(speculative and self.tree_budget and self.mag_index is not None)
        gated = self._mag_first(ids, max_tokens - 1) if speculative else None
        draft = gated or (self._fill(0, ids, max_tokens - 1) if speculative else Draft())
        tree = self._grow_tree(ids, draft, max_tokens - 1) if self._tree_step else None
        if tree is not None:
            tokens, origins, num_accepted = self._verify_tree(ids, tree, draft)
        else:
            outcome, _ = self._review(0, ids, draft, lenience=1.0)
            num_accepted = outcome.num_accepted
            tokens = draft.tokens[:num_accepted] + [outcome.next_token]
            origins = draft.origins[:num_accepted] + [0]
            if self._tree_step:  # no candidate paid for a tree: the chain went as a chain
                self.tree_counters.num_unbranched += 1
                self.tree_counters.record(len(draft), len(draft), num_accepted, num_accepted)
                self.tree_sizer.learn_chain(draft.origins, num_accepted)
        if gated:
            self.schedule.after_mag_first(num_accepted)
        # the review read its result back to the host (.tolist()), so the clock is synchronised
        seconds = time.perf_counter() - started
        if tree is None:
            self.schedule.after_step(seconds, len(tokens), speculative)
        else:
            # the schedule judges the chain (speculation against plain decoding); whether the tree
            # paid is TreeSizer's business: it sees the step as the chain alone would have run
            chain_seconds = seconds - self.tree_sizer.extra_seconds(len(tree) - tree.num_chain)
            self.schedule.after_step(max(chain_seconds, 0.0), num_accepted + 1, speculative)
        if self._tree_step:
            self.tree_sizer.after_step(seconds, len(tokens))
        return tokens, origins

    def _verify_tree(self, ids: list[int], tree: DraftTree, draft: Draft) -> tuple[list[int], list[int], int]:
        """The target verifies ``tree`` (the chain ``draft`` and its alternatives) in one forward.
        Returns the emitted tokens, their origins and how many of the chain's tokens were accepted
        (what the schedule learns from, as for a chain)."""
        target = self.levels[0]
        started, tokens_before = time.perf_counter(), target.counters.num_tokens_run
        logits = target.tree_logits(ids, tree.tokens, tree.parents)  # (N + 1, V)
        if self.params.greedy:
            outcome = verify.verify_tree_greedy(logits, tree.tokens, tree.parents)
        else:
            probs = warp(logits, self.params)  # (N + 1, V)
            outcome = verify.verify_tree_sampled(probs, tree.tokens, tree.parents, tree.laws, self.generator)
        path = outcome.path
        target.commit_path(path)
        # the verification read its result back to the host: the clock is synchronised
        num_run, seconds = target.counters.num_tokens_run - tokens_before, time.perf_counter() - started
        self.tree_sizer.after_forward(num_run, seconds, tree=True)
        self.tree_sizer.learn_tree(tree, path)
        if self.schedule.times_levels:
            self.schedule.after_forward(0, num_run, seconds)
        num_chain_accepted = tree.chain_prefix(path)
        # the target's review counters see the line it followed: the path, then the child it rejected
        children = verify.tree_children(tree.parents)[path[-1] + 1 if path else 0]
        line = path + children[:1]
        if line:
            self.reviews[0].record([self.names[tree.origins[n]] for n in line], len(path))
        won = tree.kinds[path[num_chain_accepted]][0] if num_chain_accepted < len(path) else None
        self.tree_counters.record(len(tree), tree.num_chain, len(path), num_chain_accepted, won)
        if self.schedule.size:
            self.schedule.after_review(0, draft.segments, num_chain_accepted)
        tokens = [tree.tokens[n] for n in path] + [outcome.next_token]
        return tokens, [tree.origins[n] for n in path] + [0], num_chain_accepted

    def _grow_tree(self, ids: list[int], draft: Draft, limit: int) -> DraftTree | None:
        """The chain and the candidates ``TreeSizer`` finds worth their cost: the drafters' second
        choices beside the chain's tokens, MaG's continuation of the chain, and MaG's
        alternatives at the root and under the first ``ALT_DEPTHS`` chain nodes (as deep as the
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

        def after_second(depth: int, token: int) -> Callable[[], list[int]]:
            """MaG's continuation of the second choice ``token`` at ``depth`` (asked for if wanted)."""
            context = ids + draft.tokens[:depth] + [token]
            return lambda: mag.propose(context, self.num_committed, max(1, len(draft) - depth - 1)).tokens

        branches = []
        for depth, second in enumerate(draft.seconds[:reached]):
            if second is not None:
                token, bucket = second
                more = after_second(depth, token)
                branches.append(Branch(depth - 1, [token], draft.origins[depth], "second", bucket, more))

        def extension() -> list[Branch]:
            if reached < len(draft) or len(draft) >= limit:
                return []  # the chain ends in an EOS, or at the depth limit
            tokens = mag.propose(ids + draft.tokens, self.num_committed, min(self.EXTEND, limit - len(draft))).tokens
            return [Branch(len(draft) - 1, tokens, self.mag_index, "extend", length_bucket(len(draft)))]

        def alternatives(depth: int) -> list[Branch]:
            # at the root the chain may itself be MaG's longest match: it is merged, not repeated
            context, length = ids + draft.tokens[:depth], max(2, len(draft) - depth)
            proposals = mag.propose_many(context, self.num_committed, length, TreeSizer.MAX_RANK)
            return [Branch(depth - 1, tokens, self.mag_index, "mag", rank) for rank, tokens in enumerate(proposals)]

        num_depths = min(reached, self.ALT_DEPTHS) + 1
        return self.tree_sizer.grow(tree, branches, extension, alternatives, num_depths, stop_ids)

    ALT_DEPTHS = 8  # chain nodes MaG's alternatives may hang under (deeper ones are rarely reached)
    EXTEND = 8  # MaG tokens offered past the chain's end

    def _mag_first(self, ids: list[int], limit: int) -> Draft | None:
        """MaG's draft for the target when its match is long enough to trust, else None. The
        decision depends only on the committed tokens, so it cannot bias the verification."""
        if self.schedule.mag_first is None or self.mag_index is None or limit <= 0:
            return None
        mag = self.levels[self.mag_index]
        proposal = mag.propose(ids, self.num_committed, min(self.schedule.mag_first_length(), limit))
        if proposal.match_length < self.schedule.mag_first:
            return None
        num = len(proposal.tokens)
        draft = Draft()
        draft.add(proposal.tokens, [self.mag_index] * num, [None] * num)
        if self.stop_at_eos:
            self._cut_after_eos(draft)
        return draft

    def _fill(self, reviewer: int, context: list[int], limit: int) -> Draft:
        """The draft that level ``reviewer`` will review after ``context``: at most ``limit`` tokens,
        filled by the drafters of row ``reviewer`` of the K-matrix, larger drafters first."""
        draft = Draft()
        if reviewer >= self.schedule.size or limit <= 0:
            return draft  # no drafters below: the reviewer decodes autoregressively
        ends = self.schedule.ends(reviewer)
        for column in range(reviewer, self.schedule.size):
            goal = min(ends[column], limit)
            start = len(draft)
            while len(draft) < goal:
                self._extend(column + 1, context + draft.tokens, draft, goal - len(draft), limit - len(draft))
                if self.stop_at_eos and self._cut_after_eos(draft):
                    break
            if len(draft) > start:
                draft.segments.append((column, start, len(draft)))
            if self.stop_at_eos and draft.tokens and draft.tokens[-1] in self.eos_ids:
                return draft  # positions after an EOS can never be emitted
        return draft

    def _extend(self, level_index: int, context: list[int], draft: Draft, need: int, room: int) -> None:
        """Append at least one token (at most ``room``) from level ``level_index`` to ``draft``."""
        level = self.levels[level_index]
        if level.kind == MAG_KIND:
            tokens = level.propose(context, self.num_committed, need).tokens
            draft.add(tokens, [level_index] * need, [None] * need)
            return
        sub = self._fill(level_index, context, room - 1)  # room - 1: leave space for its own token
        outcome, logits = self._review(level_index, context, sub, self.lenience)
        num_accepted = outcome.num_accepted
        probs = list(outcome.token_probs) if outcome.token_probs is not None else [None] * (num_accepted + 1)
        tokens = sub.tokens[:num_accepted] + [outcome.next_token]
        seconds = None
        if self._tree_step:
            values, indices = logits[: num_accepted + 1].topk(2, dim=-1)  # (n, 2)
            gaps = (values[:, 0] - values[:, 1]).tolist()
            seconds = [
                (b if a == token else a, confidence_bucket(gap))
                for token, (a, b), gap in zip(tokens, indices.tolist(), gaps)
            ]
        draft.add(tokens, sub.origins[:num_accepted] + [level_index], probs, seconds)

    def _review(
        self, level_index: int, context: list[int], draft: Draft, lenience: float
    ) -> tuple[verify.ReviewOutcome, torch.Tensor]:
        """One forward of a neural level over ``context + draft`` and the accept / reject of the draft."""
        level = self.levels[level_index]
        sized = level_index == 0 and self._tree_step  # a chain the tree sizer compares trees with
        timed = self.schedule.times_levels or sized
        if timed:
            started, tokens_before = time.perf_counter(), level.counters.num_tokens_run
        logits = level.next_token_logits(context + draft.tokens, len(draft) + 1)  # (K + 1, V)
        if self.params.greedy:
            outcome = verify.review_greedy(logits, draft.tokens, lenience)
        else:
            probs = warp(logits, self.params)  # (K + 1, V)
            draft_probs = self._stack_probs(draft, probs) if len(draft) else None
            outcome = verify.review_sampled(probs, draft.tokens, draft_probs, self.generator, lenience)
        if timed:  # the review read its result back to the host: the clock is synchronised
            num_run, seconds = level.counters.num_tokens_run - tokens_before, time.perf_counter() - started
            if self.schedule.times_levels:
                self.schedule.after_forward(level_index, num_run, seconds)
            if sized:
                self.tree_sizer.after_forward(num_run, seconds, tree=False)
        if len(draft):
            self.reviews[level_index].record([self.names[o] for o in draft.origins], outcome.num_accepted)
        if level_index < self.schedule.size:  # a reviewer row exists (even if its draft came out empty)
            self.schedule.after_review(level_index, draft.segments, outcome.num_accepted)
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
                    review=self.reviews[i] if kind != "mag" else None,
                    tree=self.tree_counters if i == 0 else None,
                )
            )
        return tuple(out)
