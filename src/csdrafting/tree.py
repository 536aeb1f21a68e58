"""Draft trees: the cascade's chain draft plus MaG's alternative continuations, as one trie that
the target verifies in one forward (``verify.verify_tree_greedy`` / ``verify_tree_sampled``).

Decisions, and why:
* **Only the target verifies trees.** The target's forward is where width is cheapest relative to
  a step (one large forward per step; drafters run many small ones), and the target reviews with
  lenience 1, where recursive rejection sampling is the plain theorem. A drafter reviewing a tree
  with lenience > 1 would have to carry the law that a *multi-candidate* lenient review induces
  upward, which ``verify.induced_probs`` does not describe; drafters keep reviewing chains and the
  laws their tokens carry are unchanged.
* **The chain comes first.** Node 0.. are the chain (each token with the law it was drawn from:
  ``pi`` for a neural reviewer's tokens, a point mass for MaG's), so at every chain node the
  chain's random candidate is tried before anything else. Alternatives come from MaG
  (``MaG.propose_many``): deterministic functions of the committed tokens and the chain, hence
  point masses given everything tried before them, which keeps them exact wherever they hang.
* **Merging.** Alternatives share prefixes with the chain and with each other (a trie). An
  alternative token equal to a chain token becomes a second candidate (a point mass) of the
  chain's node, tried after the chain's own law: after the chain's token was rejected, the
  residual may still hold mass on it.
* **Budget.** ``max_nodes`` bounds the nodes the target runs (on a CPU, verification turns
  compute-bound at ~16 tokens for pycode-22m); alternatives are added at the root, then under
  successive chain nodes, until the budget is spent. ``TreeSwitch`` (below) turns trees off where
  they cost more per emitted token than chains.
"""

from __future__ import annotations

import torch

Law = torch.Tensor | None  # (V,) the law a candidate was drawn from; None = a point mass


class DraftTree:
    """A trie of draft tokens; nodes in topological order; ``parents[i] == -1``: a root child."""

    __slots__ = ("tokens", "parents", "origins", "laws", "depths", "num_chain", "_child", "max_nodes", "max_depth")

    def __init__(self, max_nodes: int, max_depth: int) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.origins: list[int] = []  # the level that first proposed each node
        self.laws: list[list[Law]] = []  # per node: its candidates' laws, in try order
        self.depths: list[int] = []  # 1 for a root child
        self.num_chain = 0
        self._child: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        self.max_nodes = max_nodes
        self.max_depth = max_depth

    def __len__(self) -> int:
        return len(self.tokens)

    def _add(self, parent: int, token: int, origin: int, law: Law) -> int:
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.origins.append(origin)
        self.laws.append([law])
        self.depths.append(self.depths[parent] + 1 if parent >= 0 else 1)
        self._child[(parent, token)] = node
        return node

    def add_chain(self, tokens: list[int], origins: list[int], laws: list[Law]) -> None:
        """The cascade's draft: nodes 0..K-1, each the child of the one before."""
        assert not self.tokens, "the chain is the first branch"
        for i, (token, origin, law) in enumerate(zip(tokens, origins, laws)):
            self._add(i - 1, token, origin, law)
        self.num_chain = len(tokens)

    def add_branch(self, parent: int, tokens: list[int], origin: int, stop_ids: frozenset[int]) -> int:
        """A deterministic continuation under ``parent`` (-1: the root), merged into the trie;
        stops at the node budget, the depth limit or after a stop token. Returns nodes added."""
        added = 0
        depth = self.depths[parent] if parent >= 0 else 0
        for token in tokens:
            if depth >= self.max_depth:
                break
            node = self._child.get((parent, token))
            if node is None:
                if len(self.tokens) >= self.max_nodes:
                    break
                node = self._add(parent, token, origin, None)
                added += 1
            elif None not in self.laws[node]:
                self.laws[node].append(None)  # a point mass after the chain's law (module docstring)
            if token in stop_ids:
                break
            parent, depth = node, depth + 1
        return added

    def chain_prefix(self, path: list[int]) -> int:
        """How many leading nodes of ``path`` are the chain's (the chain is nodes 0, 1, ...)."""
        n = 0
        while n < len(path) and path[n] == n and n < self.num_chain:
            n += 1
        return n


class TreeSwitch:
    """Trees or chains, by measured cost per emitted token (the schedule's whole-speculation
    switch, one level up): a few chain steps first measure the chain's cost; tree steps are then
    judged against it, and where a tree costs more per token than a chain the step verifies chains
    for a while (doubling back-off) and retries. It reads only the clock and past steps, so it
    changes speed, never output; with ``use_timing`` off (seeded sampling must be reproducible)
    trees are always on."""

    DECAY = 0.9  # decayed sums: recent steps weigh most
    PROBE_STEPS = 4  # chain steps that measure the chain's cost (at the start, and again later)
    JUDGE_AFTER = 8  # tree steps before the first judgement
    RECHECK_EVERY = 64  # tree steps between two re-measurements of the chain
    FIRST_BACKOFF, MAX_BACKOFF = 16, 256  # chain steps after trees lost

    def __init__(self) -> None:
        self.use_timing = False
        self.backoff = self.FIRST_BACKOFF
        self.chain_time = self.chain_tokens = self.tree_time = self.tree_tokens = 0.0
        self.chain_steps_left = 0
        self.tree_steps = 0

    def begin(self, use_timing: bool) -> None:
        """A new generation; what was measured carries over when timing is on."""
        if use_timing and not self.use_timing:
            self.chain_steps_left = self.PROBE_STEPS
        self.use_timing = use_timing
        if not use_timing:
            self.chain_steps_left = 0

    def use_tree(self) -> bool:
        return self.chain_steps_left == 0

    def after_step(self, tree: bool, seconds: float, num_tokens: int) -> None:
        if not self.use_timing:
            return
        decay = self.DECAY
        if not tree:
            self.chain_time = decay * self.chain_time + seconds
            self.chain_tokens = decay * self.chain_tokens + num_tokens
            self.chain_steps_left = max(self.chain_steps_left - 1, 0)
            if self.chain_steps_left == 0:
                self.tree_time = self.tree_tokens = 0.0
                self.tree_steps = 0
            return
        self.tree_time = decay * self.tree_time + seconds
        self.tree_tokens = decay * self.tree_tokens + num_tokens
        self.tree_steps += 1
        if self.tree_steps < self.JUDGE_AFTER or self.chain_tokens == 0:
            return
        if self.tree_time / self.tree_tokens > self.chain_time / self.chain_tokens:
            self.chain_steps_left = self.backoff  # trees do not pay here: chains for a while
            self.backoff = min(2 * self.backoff, self.MAX_BACKOFF)
        elif self.tree_steps >= self.RECHECK_EVERY:
            self.chain_steps_left = self.PROBE_STEPS  # the chain's cost may have changed
            self.backoff = self.FIRST_BACKOFF
