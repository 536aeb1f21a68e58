"""Draft trees: the cascade's chain draft plus candidates hung on it (the drafters' second choices,
MaG's alternative continuations and its continuation of the chain), as one trie that the target
verifies in one forward (``verify.verify_tree_greedy`` / ``verify_tree_sampled``).

Decisions, and why:
* **Only the target verifies trees.** The target's forward is where width is cheapest relative to
  a step (one large forward per step; drafters run many small ones), and the target reviews with
  lenience 1, where recursive rejection sampling is the plain theorem. A drafter reviewing a tree
  with lenience > 1 would have to carry the law that a *multi-candidate* lenient review induces
  upward, which ``verify.induced_probs`` does not describe; drafters keep reviewing chains and the
  laws their tokens carry are unchanged.
* **The chain comes first.** Node 0.. are the chain (each token with the law it was drawn from:
  ``pi`` for a neural reviewer's tokens, a point mass for MaG's), so at every chain node the
  chain's random candidate is tried before anything else. The other candidates (a drafter's
  second-best token, MaG's ``propose_many`` and ``propose``) are deterministic functions of the
  committed tokens and the chain, hence point masses given everything tried before them, which
  keeps them exact wherever they hang.
* **Merging.** Alternatives share prefixes with the chain and with each other (a trie). An
  alternative token equal to a chain token becomes a second candidate (a point mass) of the
  chain's node, tried after the chain's own law: after the chain's token was rejected, the
  residual may still hold mass on it.
* **Budget and size.** ``max_nodes`` bounds the nodes the target runs (on a CPU, verification
  turns compute-bound at ~16 tokens for pycode-22m). Which candidates get nodes is ``TreeSizer``'s
  choice: each candidate node's value is the chance its path is accepted (acceptance measured
  online per kind of node and depth), its cost the measured seconds of one more verified token;
  a node is added while its value beats what that time buys at the current speed, and a tree
  only where its nodes also buy back what a tree forward costs beyond a chain's.
* **Candidates.** The drafters' second choices beside the chain's tokens (continued by MaG where
  that pays); MaG's alternatives at
  the root and under the first ``TreeParams.alt_depths`` chain nodes; MaG's continuation of the chain's last
  token (a chain the K-matrix cut short can still be verified further where that pays).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .report import StepReport

Law = torch.Tensor | None  # (V,) the law a candidate was drawn from; None = a point mass
Kind = tuple  # an acceptance bucket: (source, ...) (TreeSizer counts acceptance per bucket)

MAX_KIND_DEPTH = 15  # deeper nodes share their branch's bucket at this depth


@dataclass(frozen=True)
class TreeParams:
    """The tree sizer's tuning constants (``TreeSizer``); tests and callers pass their own."""

    # acceptance of each kind of node before any count, and the pseudo-tries behind it
    prior_chain: float = 0.7
    prior_second: float = 0.1
    prior_mag: float = 0.1
    prior_extend: float = 0.5
    prior_weight: float = 2.0
    max_count: float = 256.0  # tries past which a bucket's counts are halved
    explore_every: int = 32  # every so many trees take every candidate (1: every tree takes all)
    max_rank: int = 3  # MaG alternatives asked for per place (ranks 0, 1, 2)
    alt_depths: int = 8  # chain nodes MaG's alternatives may hang under (deeper ones are rarely reached)
    extend: int = 8  # MaG tokens offered past the chain's end
    cost_decay: float = 0.98  # of the forward-cost fit and of the throughput
    prior_token_share: float = 0.05  # a verified token's cost as a share of a forward, until fitted
    min_spread: float = 0.5  # variance of the verified token counts below which no slope is fitted
    refit_every: int = 8  # forwards between two fits of the costs

    def prior(self, source: str) -> float:
        return {"chain": self.prior_chain, "second": self.prior_second, "mag": self.prior_mag}.get(
            source, self.prior_extend
        )


def length_bucket(num_tokens: int) -> int:
    """1, 2-3, 4-7, 8-15, 16-31, 32+ tokens: a chain's length says how its drafter was doing
    (adaptive lengths shrink after rejections), so its tokens' acceptance is counted apart."""
    return min(num_tokens, 32).bit_length()


def chain_kind(origin: int, depth: int, length: int) -> Kind:
    """The bucket of a chain token: its proposing level, the chain's length, its depth."""
    return ("chain", origin, length_bucket(length), min(depth, MAX_KIND_DEPTH))


SECOND_GAPS = (1.0, 3.0)  # top-1 minus top-2 logit: below 1, 1 to 3, 3 and more (a second choice's bucket)


def confidence_bucket(gap: float) -> int:
    """How sure a drafter was of its first choice, from its top-2 logit gap: a second choice is
    worth more where the first was unsure (measured per bucket like every kind)."""
    return sum(gap >= edge for edge in SECOND_GAPS)


@dataclass
class Branch:
    """A deterministic candidate continuation under node ``parent`` (-1: the root).
    ``source``: "second" (a drafter's second choice; ``rank``: its ``confidence_bucket``), "mag"
    (MaG's alternative of rank ``rank``) or "extend" (MaG's continuation of the chain's last
    token; ``rank``: the chain's ``length_bucket``). ``more`` computes the rest of the branch
    only when it is wanted (MaG's continuation after a second choice)."""

    parent: int
    tokens: list[int]
    origin: int  # the level that proposed it
    source: str
    rank: int = 0
    more: Callable[[], list[int]] | None = None

    def kind(self, j: int) -> Kind:
        return (self.source, self.rank, min(j, MAX_KIND_DEPTH))

    def complete(self) -> bool:
        """Append the continuation ``more`` computes (once); whether the branch grew."""
        if self.more is None:
            return False
        more, self.more = self.more, None
        before = len(self.tokens)
        self.tokens.extend(more())
        return len(self.tokens) > before


class DraftTree:
    """A trie of draft tokens; nodes in topological order; ``parents[i] == -1``: a root child."""

    __slots__ = (
        "tokens",
        "parents",
        "origins",
        "laws",
        "depths",
        "kinds",
        "num_chain",
        "_child",
        "max_nodes",
        "max_depth",
    )

    def __init__(self, max_nodes: int, max_depth: int) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.origins: list[int] = []  # the level that first proposed each node
        self.laws: list[list[Law]] = []  # per node: its candidates' laws, in try order
        self.depths: list[int] = []  # 1 for a root child
        self.kinds: list[Kind] = []  # per node: the acceptance bucket it is measured in (TreeSizer)
        self.num_chain = 0
        self._child: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        self.max_nodes = max_nodes
        self.max_depth = max_depth

    def __len__(self) -> int:
        return len(self.tokens)

    def _add(self, parent: int, token: int, origin: int, law: Law, kind: Kind) -> int:
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.origins.append(origin)
        self.laws.append([law])
        self.depths.append(self.depths[parent] + 1 if parent >= 0 else 1)
        self.kinds.append(kind)
        self._child[(parent, token)] = node
        return node

    def add_chain(self, tokens: list[int], origins: list[int], laws: list[Law]) -> None:
        """The cascade's draft: nodes 0..K-1, each the child of the one before (built in bulk:
        every step that may verify a tree builds one)."""
        assert not self.tokens, "the chain is the first branch"
        num = len(tokens)
        self.tokens, self.origins = list(tokens), list(origins)
        self.parents = list(range(-1, num - 1))
        self.laws = [[law] for law in laws]
        self.depths = list(range(1, num + 1))
        self.kinds = [chain_kind(origin, depth, num) for depth, origin in enumerate(origins)]
        self._child = dict(zip(zip(self.parents, self.tokens), range(num)))
        self.num_chain = num

    def add_point_mass(self, parent: int, token: int, origin: int, kind: Kind) -> int | None:
        """A deterministic candidate ``token`` under ``parent`` (-1: the root), merged into the
        trie: an existing node with that token gets a point-mass candidate (module docstring).
        Returns the node, or None where the node budget or the depth limit leaves no room."""
        if (self.depths[parent] if parent >= 0 else 0) >= self.max_depth:
            return None
        node = self._child.get((parent, token))
        if node is None:
            if len(self.tokens) >= self.max_nodes:
                return None
            return self._add(parent, token, origin, None, kind)
        if None not in self.laws[node]:
            self.laws[node].append(None)
        return node

    def add_branch(self, branch: Branch, stop_ids: frozenset[int]) -> int:
        """A candidate continuation merged into the trie, as far as the budget and the depth
        limit allow, never past a stop token. Returns the nodes added."""
        before, parent = len(self.tokens), branch.parent
        for j, token in enumerate(branch.tokens):
            parent = self.add_point_mass(parent, token, branch.origin, branch.kind(j))
            if parent is None or token in stop_ids:
                break
        return len(self.tokens) - before

    def has_child(self, parent: int, token: int) -> bool:
        return (parent, token) in self._child

    @property
    def branched(self) -> bool:
        """Whether anything beyond the chain was added (a node, or a second candidate)."""
        return len(self.tokens) > self.num_chain or any(len(laws) > 1 for laws in self.laws)

    def chain_prefix(self, path: list[int]) -> int:
        """How many leading nodes of ``path`` are the chain's (the chain is nodes 0, 1, ...)."""
        n = 0
        while n < len(path) and path[n] == n and n < self.num_chain:
            n += 1
        return n


class TreeSizer:
    """Which candidates a tree gets, by value against cost (Sequoia's and EAGLE-2's idea, with
    acceptance and costs measured online instead of fixed in advance).

    * **Value** of a candidate node: the chance that its path is accepted, the product of the
      conditional acceptance rates along it. Rates are counted per ``Kind`` bucket (chain tokens by
      proposing level and depth; second choices by level; MaG's alternatives by rank and depth in
      their branch; the chain's extension by depth): a node is *tried* when its parent was
      accepted (or it hangs off the root) and *accepted* when it is on the accepted path. Counts
      start from a small prior and are halved past ``params.max_count`` (recent steps weigh most).
    * **Cost**: the target's forward-and-verify seconds are fitted (decayed least squares over
      tree and chain steps) as a per-forward part, a per-token part, and what a tree forward
      costs beyond a chain forward of the same size (the tree mask, moving the accepted path's
      keys and values into place). Until the fit has seen enough spread, a token costs
      ``params.prior_token_share`` of a forward and a tree nothing extra.
    * Candidates are taken by value, highest first (a child is never worth more than its parent),
      while a node's value beats what its time would buy at the current speed
      (``value > seconds per token * tokens per second``); then the tree as a whole must buy back
      its extra cost too, else the step verifies the chain alone. Every ``params.explore_every``-th tree
      takes every candidate, so that kinds that are not worth a node stay measured, and the cost
      fit keeps seeing trees.

    It reads only past steps and the clock, so it changes speed, never output. Without timing
    (seeded sampling must be reproducible) it learns within the generation only and prices a
    node at ``params.prior_token_share`` of a step's tokens, so a seed gives the same trees, hence the
    same output, whatever ran before; the first tree of such a generation takes every candidate."""

    def __init__(self, params: TreeParams | None = None) -> None:
        self.params = params if params is not None else TreeParams()
        self.use_timing = False
        self._forget()
        # decayed sums for the fit seconds ~ a + b * tokens + c * is_tree: X'X's entries, X'y
        self._sums = [0.0] * 9
        self._costs: tuple[float, float] | None = None
        self._forwards_since_fit = 0

    def _forget(self) -> None:
        """Drop the acceptance counts and the step history (the fitted costs are the clock's)."""
        self._tries: dict[Kind, float] = {}
        self._hits: dict[Kind, float] = {}
        self._step_seconds = self._step_tokens = self._steps = 0.0
        self._num_trees = 0

    def begin(self, use_timing: bool) -> None:
        """A new generation. With timing, what was learned carries over (it changes speed, never
        output); without, the generation starts afresh (reproducible)."""
        if not use_timing or not self.use_timing:
            self._forget()
        self.use_timing = use_timing

    # -- what it learns -----------------------------------------------------------------------------

    def rate(self, kind: Kind) -> float:
        prior = self.params.prior(kind[0]) * self.params.prior_weight
        return (self._hits.get(kind, 0.0) + prior) / (self._tries.get(kind, 0.0) + self.params.prior_weight)

    def _count(self, kind: Kind, hit: bool) -> None:
        tries = self._tries.get(kind, 0.0) + 1
        hits = self._hits.get(kind, 0.0) + hit
        if tries > self.params.max_count:
            tries, hits = tries / 2, hits / 2
        self._tries[kind], self._hits[kind] = tries, hits

    def learn_tree(self, tree: DraftTree, path: list[int]) -> None:
        """After a tree verification: every node whose parent was accepted was tried."""
        accepted = set(path)
        for node, parent in enumerate(tree.parents):
            if parent < 0 or parent in accepted:
                self._count(tree.kinds[node], node in accepted)

    def learn_chain(self, origins: list[int], num_accepted: int) -> None:
        """After a chain verification: chain tokens up to the first rejected one were tried."""
        for depth in range(min(num_accepted + 1, len(origins))):
            self._count(chain_kind(origins[depth], depth, len(origins)), depth < num_accepted)

    def after_forward(self, num_tokens: int, seconds: float, tree: bool) -> None:
        """The target ran ``num_tokens`` positions and verified them in ``seconds``."""
        x = (1.0, float(num_tokens), float(tree))
        decay, sums = self.params.cost_decay, self._sums
        for i, (a, b) in enumerate(self._PAIRS):
            sums[i] = decay * sums[i] + x[a] * x[b]
        for i in range(3):
            sums[6 + i] = decay * sums[6 + i] + seconds * x[i]
        self._forwards_since_fit += 1

    _PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # the entries of X'X kept in _sums[:6]

    def observe(self, report: StepReport) -> None:
        """Learn from a finished step that could have verified a tree (others are not its business):
        the target's forward costs, which nodes were accepted, the step's throughput."""
        outcome = report.tree
        if outcome is None:
            return
        for forward in report.forwards:
            if forward.level == 0:
                self.after_forward(forward.num_tokens, forward.seconds, tree=forward.tree)
        if outcome.tree is not None:
            self.learn_tree(outcome.tree, list(outcome.path))
        else:
            self.learn_chain(list(outcome.chain_origins), outcome.num_chain_accepted)
        self.after_step(report.seconds, len(report.tokens))

    def after_step(self, seconds: float, num_tokens: int) -> None:
        decay = self.params.cost_decay
        self._step_seconds = decay * self._step_seconds + (seconds if self.use_timing else 0.0)
        self._step_tokens = decay * self._step_tokens + num_tokens
        self._steps = decay * self._steps + 1

    def costs(self) -> tuple[float, float] | None:
        """(seconds per verified token, extra seconds of a tree forward); None before any forward."""
        if self._sums[0] > 0 and (self._costs is None or self._forwards_since_fit >= self.params.refit_every):
            self._costs, self._forwards_since_fit = self._fit(), 0
        return self._costs

    def _fit(self) -> tuple[float, float]:
        """Least squares of seconds ~ a + b * tokens + c * is_tree over the decayed sums (the
        normal equations, 3 x 3 or 2 x 2 without trees, solved by Cramer's rule: no numpy call
        on a step's path)."""
        s00, s01, s02, s11, s12, s22, y0, y1, y2 = self._sums
        mean_seconds = y0 / s00
        fallback = (self.params.prior_token_share * mean_seconds, 0.0)
        if s11 / s00 - (s01 / s00) ** 2 < self.params.min_spread:
            return fallback  # (nearly) every forward the same size so far: no slope to fit
        if s22 > 0:  # trees were timed: fit their extra cost too
            matrix = ((s00, s01, s02), (s01, s11, s12), (s02, s12, s22))
            solution = _solve3(matrix, (y0, y1, y2))
            if solution is None:  # every forward a tree: no separate tree term
                return fallback
            _, per_token, per_tree = solution
        else:
            per_token, per_tree = (s00 * y1 - s01 * y0) / (s00 * s11 - s01 * s01), 0.0
        if not 0 <= per_token <= mean_seconds:  # an ill-conditioned fit (too little spread)
            return fallback
        return per_token, max(per_tree, 0.0)

    def extra_seconds(self, num_extra_nodes: int) -> float:
        """What a tree with ``num_extra_nodes`` nodes beyond its chain costs beyond the chain's
        forward, by the fitted costs (0 before any fit)."""
        costs = self.costs()
        if costs is None:
            return 0.0
        per_token, per_tree = costs
        return per_tree + per_token * num_extra_nodes

    def start_tree(self) -> tuple[float, float] | None:
        """Count a new tree and return its threshold: (the value a node must have, the value a
        tree must add beyond its nodes' share) in emitted tokens; None: take every candidate, in
        order (every ``explore_every``-th tree, and before any step was seen)."""
        self._num_trees += 1
        if self._num_trees % self.params.explore_every == 0:
            return None
        return self.threshold()

    def threshold(self) -> tuple[float, float] | None:
        """The threshold of a tree that takes candidates by value (``start_tree``), from what was
        learned so far; None: no measurement to price nodes with yet."""
        if self._steps == 0:
            return None
        if not self.use_timing:  # no clock: a node costs a share of a step, which is worth its tokens
            return self.params.prior_token_share * self._step_tokens / self._steps, 0.0
        costs = self.costs()
        if costs is None or self._step_seconds == 0:
            return None
        tokens_per_second = self._step_tokens / self._step_seconds
        per_token, per_tree = costs
        return per_token * tokens_per_second, per_tree * tokens_per_second

    # -- what it builds -----------------------------------------------------------------------------

    def grow(
        self,
        tree: DraftTree,
        branches: list[Branch],
        extension: Callable[[], list[Branch]],
        alternatives: Callable[[int], list[Branch]],
        num_alternative_depths: int,
        stop_ids: frozenset[int],
    ) -> DraftTree | None:
        """``tree`` (which holds the chain) with the candidates worth their cost: ``branches``
        (already at hand), ``extension()`` (the chain's continuation) and ``alternatives(depth)``
        (under chain node ``depth - 1``, for depths below ``num_alternative_depths``); the last
        two are asked for only where something they return could be worth a node. None where no
        candidate pays for a tree: the chain is then verified as a chain."""
        threshold = self.start_tree()
        if threshold is None:
            branches = branches + extension()
            for depth in range(num_alternative_depths):
                branches = branches + alternatives(depth)
            for branch in branches:
                branch.complete()
                tree.add_branch(branch, stop_ids)
            return tree if tree.branched else None
        per_node, per_tree = threshold
        reach = [1.0] * (tree.num_chain + 1)  # reach[i + 1]: the chance chain node i is accepted
        for node in range(tree.num_chain):
            reach[node + 1] = reach[node] * self.rate(tree.kinds[node])
        if reach[-1] * self.rate(("extend", length_bucket(tree.num_chain), 0)) > per_node:
            branches = branches + extension()
        best_alternative = max(self.rate(("mag", rank, 0)) for rank in range(self.params.max_rank))
        for depth in range(num_alternative_depths):
            if reach[depth] * best_alternative > per_node:
                branches = branches + alternatives(depth)
        # frontier: (-value, branch index, position in the branch, parent node)
        frontier = [
            (-reach[branch.parent + 1] * self.rate(branch.kind(0)), index, 0, branch.parent)
            for index, branch in enumerate(branches)
        ]
        heapq.heapify(frontier)
        gain = 0.0  # value added beyond the nodes' own cost
        while frontier and -frontier[0][0] > per_node:
            negative_value, index, j, parent = heapq.heappop(frontier)
            branch, value = branches[index], -negative_value
            token = branch.tokens[j]
            new = not tree.has_child(parent, token)
            node = tree.add_point_mass(parent, token, branch.origin, branch.kind(j))
            if node is None:
                continue  # out of budget or depth here; merges elsewhere cost nothing
            if new:
                gain += value - per_node
            elif node < tree.num_chain:
                value = reach[node + 1]  # merged into the chain: worth what the chain's node is
            if token in stop_ids:
                continue
            child_value = value * self.rate(branch.kind(j + 1))
            if j + 1 < len(branch.tokens) or (child_value > per_node and branch.complete()):
                heapq.heappush(frontier, (-child_value, index, j + 1, node))
        # (candidates below the threshold are left out, merges into existing nodes included: in
        # greedy decoding they add nothing, and a tree that did not pay is not verified anyway)
        return tree if gain > per_tree else None


def _det3(m) -> float:
    (a, b, c), (d, e, f), (g, h, i) = m
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def _solve3(matrix, rhs) -> tuple[float, float, float] | None:
    """x with matrix @ x = rhs (Cramer's rule); None for a (numerically) singular matrix."""
    det = _det3(matrix)
    scale = matrix[0][0] * matrix[1][1] * matrix[2][2]
    if abs(det) <= 1e-12 * abs(scale):
        return None
    columns = [[[rhs[r] if c == k else matrix[r][c] for c in range(3)] for r in range(3)] for k in range(3)]
    return tuple(_det3(column) / det for column in columns)
