"""Accept / reject: pure functions of (reviewer logits or probs, draft tokens, draft probs).

No model, no cache and no state lives here, so the math can be tested exactly on its own.

Vocabulary (vLLM's): a reviewed draft yields *accepted* tokens, then either a *recovered* token
(drawn from the residual after a rejection) or a *bonus* token (drawn from the reviewer after the
whole draft was accepted). Either way the review emits ``num_accepted + 1`` tokens.

Notation inside this module follows the speculative sampling papers: ``p`` is the reviewer's
distribution (the target's, or a larger drafter's), ``q`` the distribution the draft token was
drawn from. A deterministic draft token (MaG) has a point mass ``q = one_hot(x)``.

Lenience ``l >= 1`` (the CS Drafting paper's ``l``) only ever loosens how a *drafter* reviews a
smaller drafter; the target always reviews with ``l = 1``, which is exact speculative sampling.

* Greedy review: accept draft token ``x`` while ``l * p(x) >= max_y p(y)``, that is while ``x`` is
  within a factor ``l`` of the reviewer's own argmax. With ``l = 1`` this is "accept while the draft
  equals the argmax"; it is computed on logits (``logit(x) >= max logit - log l``), no softmax.
* Sampled review: accept ``x ~ q`` with probability ``min(1, l * p(x) / q(x))``; after a rejection
  draw from the residual ``r ∝ max(0, p - min(q, l * p))``. The token emitted at that position then
  follows ``pi = min(q, l * p) + (1 - beta) * r`` with ``beta = sum(min(q, l * p))``: for ``l = 1``
  ``pi = p`` exactly, for ``l > 1`` ``pi`` is a different but known distribution, and it is ``pi``
  that the token carries upward, so the next reviewer's test stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReviewOutcome:
    """The result of one review.

    num_accepted: how many leading draft tokens were accepted.
    next_token: the recovered token (after a rejection) or the bonus token (after full acceptance).
    token_probs: sampling only; (num_accepted + 1, V), the law each emitted token was drawn from
        (accepted tokens first, then next_token). None for greedy reviews.
    """

    num_accepted: int
    next_token: int
    token_probs: torch.Tensor | None = None


def review_greedy(reviewer_logits: torch.Tensor, draft_ids: list[int], lenience: float = 1.0) -> ReviewOutcome:
    """Greedy review of ``draft_ids`` (K) against reviewer logits (K + 1, V).

    Row i of the logits predicts the token at draft position i; row K predicts the bonus token.
    """
    num_draft = len(draft_ids)
    top_ids = reviewer_logits.argmax(dim=-1)  # (K + 1,)
    if num_draft == 0:
        return ReviewOutcome(0, int(top_ids[0]))
    if lenience == 1.0:
        top = top_ids.tolist()
        num_accepted = 0
        while num_accepted < num_draft and draft_ids[num_accepted] == top[num_accepted]:
            num_accepted += 1
        return ReviewOutcome(num_accepted, top[num_accepted])
    draft = torch.tensor(draft_ids, device=reviewer_logits.device).unsqueeze(-1)  # (K, 1)
    head = reviewer_logits[:num_draft]  # (K, V)
    draft_logits = head.gather(-1, draft).squeeze(-1)  # (K,)
    within = draft_logits >= head.max(dim=-1).values - math.log(lenience)  # (K,)
    ok = within.tolist()
    num_accepted = ok.index(False) if False in ok else num_draft
    return ReviewOutcome(num_accepted, int(top_ids[num_accepted]))


def accepted_mass(reviewer_probs: torch.Tensor, draft_probs: torch.Tensor, lenience: float = 1.0) -> torch.Tensor:
    """min(q, l * p) (..., V): the probability of drawing each token and then accepting it."""
    return torch.minimum(draft_probs, lenience * reviewer_probs)


def residual(reviewer_probs: torch.Tensor, draft_probs: torch.Tensor, lenience: float = 1.0) -> torch.Tensor:
    """The distribution to draw from after a rejection (..., V): normalised max(0, p - min(q, l p)).

    Where the residual has no mass a rejection cannot happen (rejection probability is
    1 - beta <= sum of the residual); p is returned there so the result is always a distribution
    and never 0/0.
    """
    leftover = (reviewer_probs - accepted_mass(reviewer_probs, draft_probs, lenience)).clamp_min(0)
    total = leftover.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, leftover / total.clamp_min(torch.finfo(total.dtype).tiny), reviewer_probs)


def induced_probs(reviewer_probs: torch.Tensor, draft_probs: torch.Tensor, lenience: float = 1.0) -> torch.Tensor:
    """pi (..., V): the law of the token a review emits at a position, accepted or recovered."""
    accepted = accepted_mass(reviewer_probs, draft_probs, lenience)
    beta = accepted.sum(dim=-1, keepdim=True)
    return accepted + (1 - beta).clamp_min(0) * residual(reviewer_probs, draft_probs, lenience)


def review_sampled(
    reviewer_probs: torch.Tensor,
    draft_ids: list[int],
    draft_probs: torch.Tensor,
    generator: torch.Generator | None,
    lenience: float = 1.0,
) -> ReviewOutcome:
    """Speculative sampling review of ``draft_ids`` (K) drawn from ``draft_probs`` (K, V) against
    the reviewer's warped probabilities (K + 1, V).
    """
    num_draft = len(draft_ids)
    if num_draft == 0:
        bonus = torch.multinomial(reviewer_probs[0], 1, generator=generator)
        return ReviewOutcome(0, int(bonus), reviewer_probs[:1])
    device = reviewer_probs.device
    draft = torch.tensor(draft_ids, device=device).unsqueeze(-1)  # (K, 1)
    head = reviewer_probs[:num_draft]  # (K, V)
    draft_probs = draft_probs.to(device=device, dtype=head.dtype)
    p_x = head.gather(-1, draft).squeeze(-1)  # (K,)
    q_x = draft_probs.gather(-1, draft).squeeze(-1)  # (K,)
    # q(x) > 0 whenever x was really drawn from q; a zero means "never accept"
    accept_prob = torch.where(q_x > 0, (lenience * p_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny)).clamp(max=1), 0)
    uniform = torch.rand(num_draft, generator=generator, device=device, dtype=head.dtype)
    accepted = (uniform < accept_prob).tolist()
    num_accepted = accepted.index(False) if False in accepted else num_draft

    if num_accepted == num_draft:
        next_probs = reviewer_probs[num_draft]  # bonus: the reviewer's own next-token law
        draw_from = next_probs
    else:
        draw_from = residual(head[num_accepted], draft_probs[num_accepted], lenience)
        next_probs = None  # filled below: the position's law is pi, not the residual
    next_token = int(torch.multinomial(draw_from, 1, generator=generator))

    num_positions = num_accepted + (0 if num_accepted == num_draft else 1)
    if lenience == 1.0:
        # exact speculative sampling: every reviewed position follows p itself
        token_probs = reviewer_probs[: num_accepted + 1]
    else:
        pi = induced_probs(head[:num_positions], draft_probs[:num_positions], lenience)
        token_probs = pi if next_probs is None else torch.cat([pi, next_probs.unsqueeze(0)])
    return ReviewOutcome(num_accepted, next_token, token_probs)


# -- token trees -----------------------------------------------------------------------------------
#
# A draft tree has nodes 0..N-1 in topological order (a parent before its children); ``parents[i]``
# is node i's parent (-1: a child of the root, the committed context). Siblings are tried in node
# order. Row 0 of the reviewer's logits / probs is the law after the context; row i + 1 the law
# after node i's path. Trees are verified only by the target (lenience 1): see ``step.py`` for why.
#
# Sampling is recursive rejection sampling (SpecInfer's multi-draft speculative sampling). At a
# node with reviewer law p, each candidate (token x, law q it was drawn from) is tried in turn:
# accept with probability min(1, p(x) / q(x)); after a rejection p <- normalise(max(p - q, 0)).
# When every candidate is rejected the recovered token is drawn from what is left of p. Proof
# sketch (per round j with current law p_j): P(emit y in round j) = min(q_j, p_j)(y), P(reject) =
# sum max(p_j - q_j, 0), and by induction the later rounds emit exactly p_{j+1} = the normalised
# residual; so the node emits min(q_j, p_j) + (1 - beta_j) p_{j+1} = p_j, that is p. The only
# requirement: given everything decided before round j (earlier candidates, their rejections),
# candidate j's token follows q_j. A deterministic candidate (MaG, a drafter's argmax) is a point
# mass given that history however it depends on it, so it is exact wherever it is tried. A random
# candidate must be tried only once and before anything chosen with knowledge of its value: a
# drawn token retried against the residual is the same draw counted twice (biased; a mutant in
# the tests). Point masses reduce to "draw y from the current p, descend if y is a child".


@dataclass(frozen=True)
class TreeOutcome:
    """The result of a tree verification: ``path`` the accepted nodes, root to deepest, then the
    recovered or bonus token ``next_token``; ``num_accepted == len(path)``."""

    path: list[int]
    next_token: int

    @property
    def num_accepted(self) -> int:
        return len(self.path)


def tree_children(parents: list[int]) -> list[list[int]]:
    """children[i + 1]: node i's children in try order; children[0]: the root's."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        if parent >= node:
            raise ValueError(f"tree nodes must follow their parents: node {node} has parent {parent}")
        children[parent + 1].append(node)
    return children


def verify_tree_greedy(reviewer_logits: torch.Tensor, tokens: list[int], parents: list[int]) -> TreeOutcome:
    """Greedy: from the root, descend into the child whose token is the reviewer's argmax;
    ``reviewer_logits`` (N + 1, V). The emitted tokens are exactly plain greedy decoding's."""
    top = reviewer_logits.argmax(dim=-1).tolist()  # (N + 1,)
    children = tree_children(parents)
    path: list[int] = []
    row = 0
    while True:
        nxt = next((c for c in children[row] if tokens[c] == top[row]), None)
        if nxt is None:
            return TreeOutcome(path, top[row])
        path.append(nxt)
        row = nxt + 1


def verify_tree_sampled(
    reviewer_probs: torch.Tensor,
    tokens: list[int],
    parents: list[int],
    draft_probs: list[list[torch.Tensor | None]],
    generator: torch.Generator | None,
) -> TreeOutcome:
    """Recursive rejection sampling over a tree (see the proof sketch above).

    reviewer_probs: (N + 1, V) the target's warped laws per row. draft_probs[i]: node i's
    candidates in try order, each the law (V,) its token was drawn from, or None for a point mass
    (a token proposed deterministically); a node proposed both by a drafter and by MaG carries two.
    """
    children = tree_children(parents)
    path: list[int] = []
    row = 0
    while True:
        p = reviewer_probs[row]
        chosen = None
        pending: list[int] = []  # children only point masses remain for
        for child in children[row]:
            x = tokens[child]
            for law in draft_probs[child]:
                if law is None:
                    pending.append(child)
                    continue
                if pending:
                    # a random candidate after point masses: settle those first (one draw from p)
                    chosen, p = _settle_point_masses(p, pending, tokens, generator)
                    pending = []
                    if chosen is not None:
                        break
                law = law.to(p.dtype)
                q_x = float(law[x])
                accept = min(1.0, float(p[x]) / q_x) if q_x > 0 else 0.0
                if float(torch.rand((), generator=generator, dtype=torch.float64)) < accept:
                    chosen = child
                    break
                p = residual(p, law)
            if chosen is not None:
                break
        if chosen is None and pending:
            chosen, p = _settle_point_masses(p, pending, tokens, generator)
        if chosen is None:
            return TreeOutcome(path, int(torch.multinomial(p, 1, generator=generator)))
        path.append(chosen)
        row = chosen + 1


def _settle_point_masses(p, pending, tokens, generator) -> tuple[int | None, torch.Tensor]:
    """Point-mass candidates tried one after another, in one draw: y ~ p; a pending child with
    token y is accepted, else every pending token is rejected and p loses their mass."""
    y = int(torch.multinomial(p, 1, generator=generator))
    for child in pending:
        if tokens[child] == y:
            return child, p
    rest = p.clone()
    rest[[tokens[c] for c in pending]] = 0
    # conditioning on y not being a pending token; y itself is a valid draw from that law, but the
    # rounds after must see the residual, so the draw is discarded and the residual returned
    return None, rest / rest.sum()
