"""MaG (Max-Gram): the statistical drafter at the bottom of the cascade.

To propose the next token, MaG looks for the longest suffix of the current tokens (up to
``max_ngram`` tokens) that occurs earlier in the prompt or the output, and proposes the tokens
that followed that occurrence. When several earlier occurrences match, the **most recent one
wins** (code and prose repeat what they said last more often than what they said first).
When not even the last token occurred before, a bigram table (token -> most frequent next
token in a corpus) fills in one token, and the search starts again from the extended suffix.

Cost: the committed tokens are indexed incrementally (every n-gram ending at a position, mapped
to its latest position), so a proposal is a handful of dict lookups whatever the context length;
nothing is rescanned per call. The draft tokens after the committed prefix are not indexed (they
are not prompt or output yet) but do take part in the suffix being looked up.

Its proposals are deterministic: in sampling mode they are point masses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .base import MAG, LevelCounters


@dataclass(frozen=True)
class Proposal:
    """MaG's draft: the tokens, and how long a suffix of the context its first token continues
    (0: no earlier occurrence, the bigram table or a repeat filled it in)."""

    tokens: list[int]
    match_length: int


class BigramTable:
    """Most frequent next token for every token id (-1 where the corpus never had one)."""

    def __init__(self, next_token: np.ndarray, fallback_token: int) -> None:
        self.next_token = next_token.astype(np.int64)
        self.fallback_token = int(fallback_token)
        self._lookup = self.next_token.tolist()  # Python ints: indexing a list beats numpy per token

    def __call__(self, token: int) -> int:
        if 0 <= token < len(self._lookup):
            nxt = self._lookup[token]
            if nxt >= 0:
                return nxt
        return self.fallback_token

    @property
    def vocab_size(self) -> int:
        return len(self.next_token)

    @classmethod
    def from_token_ids(cls, sequences, vocab_size: int) -> BigramTable:
        """Count every (token, next token) pair in the given token-id sequences."""
        codes = []
        unigram = np.zeros(vocab_size, dtype=np.int64)
        for seq in sequences:
            ids = np.asarray(seq, dtype=np.int64)
            if ids.size == 0:
                continue
            unigram += np.bincount(ids, minlength=vocab_size)
            if ids.size > 1:
                codes.append(ids[:-1] * vocab_size + ids[1:])
        next_token = np.full(vocab_size, -1, dtype=np.int64)
        if codes:
            pairs, counts = np.unique(np.concatenate(codes), return_counts=True)
            first, second = pairs // vocab_size, pairs % vocab_size
            # sort by (first token, count): the last row of each first-token group is its argmax;
            # np.lexsort is stable, so ties go to the smallest next-token id
            order = np.lexsort((-second, counts, first))
            first, second = first[order], second[order]
            group_last = np.append(first[1:] != first[:-1], True)
            next_token[first[group_last]] = second[group_last]
        return cls(next_token, int(unigram.argmax()))

    def save(self, path: str | Path) -> None:
        np.save(Path(path), np.concatenate([[self.fallback_token], self.next_token]).astype(np.int32))

    @classmethod
    def load(cls, path: str | Path) -> BigramTable:
        try:
            data = np.load(Path(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read bigram table {path}: {exc}") from None
        if data.ndim != 1 or data.size < 2:
            raise ConfigError(f"{path} is not a csdrafting bigram table (expected a 1-D int array)")
        return cls(data[1:], int(data[0]))


class MaG:
    """Max-Gram drafter over prompt + output, with a bigram fallback."""

    kind = MAG
    name = "mag"
    runner_name = "mag"
    num_params = 0

    def __init__(self, bigram: BigramTable | None = None, max_ngram: int = 12) -> None:
        if max_ngram < 1:
            raise ConfigError(f"MaG max_ngram must be >= 1, got {max_ngram}")
        self.bigram = bigram
        self.max_ngram = max_ngram
        self.reset()

    def reset(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> latest end position with a successor
        self._tokens: list[int] = []  # the committed tokens indexed so far
        self.counters = LevelCounters()  # num_forwards counts proposals

    def observe(self, ids: list[int], num_committed: int) -> None:
        """Index every n-gram that ends before the last committed token (so it has a successor)."""
        tokens = self._tokens
        if len(tokens) > num_committed or tokens != ids[: len(tokens)]:
            self.reset()  # a different sequence: start over (never happens within one generation)
            tokens = self._tokens
        start = len(tokens)
        tokens.extend(ids[start:num_committed])
        index = self._index
        for end in range(max(0, start - 1), num_committed - 1):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                index[tuple(tokens[end - n + 1 : end + 1])] = end

    def propose(self, ids: list[int], num_committed: int, num_tokens: int) -> Proposal:
        """``num_tokens`` tokens to follow ``ids``, of which the first ``num_committed`` are the
        prompt and accepted output (indexed), the rest a draft in progress (not indexed)."""
        self.counters.num_forwards += 1
        self.observe(ids, num_committed)
        context = ids  # continuations are read from here; proposals extend a virtual copy
        proposal: list[int] = []
        first_match_length = -1  # suffix length matched for the first proposed token
        while len(proposal) < num_tokens:
            tail = (context[-self.max_ngram :] + proposal)[-self.max_ngram :]
            ends = self._match_ends(tail)
            match_end, match_length = (ends[-1], len(ends)) if ends else (-1, 0)
            if first_match_length < 0:
                first_match_length = match_length
            if match_end >= 0:
                follow = context[match_end + 1 : match_end + 1 + num_tokens - len(proposal)]
                proposal.extend(follow)
            elif self.bigram is not None:
                proposal.append(self.bigram(tail[-1]))
            else:
                proposal.append(tail[-1])  # no statistics at all: repeat (any guess is lossless)
        return Proposal(proposal, max(first_match_length, 0))

    def propose_many(self, ids: list[int], num_committed: int, num_tokens: int, max_branches: int) -> list[list[int]]:
        """Up to ``max_branches`` distinct continuations (each at most ``num_tokens``) of ``ids``,
        for a draft tree: after the latest occurrence of the longest matching suffix, then of
        shorter suffixes (whose latest occurrences may be elsewhere and continue differently).
        Only committed tokens are read; no bigram fallback (the chain already has MaG's guess)."""
        self.counters.num_forwards += 1
        self.observe(ids, num_committed)
        ends = self._match_ends(ids[-self.max_ngram :])
        branches: list[list[int]] = []
        for end in reversed(ends):  # longest suffix first
            follow = ids[end + 1 : min(end + 1 + num_tokens, num_committed)]
            if follow and follow not in branches:
                branches.append(follow)
                if len(branches) == max_branches:
                    break
        return branches

    def _match_ends(self, tail: list[int]) -> list[int]:
        """For n = 1, 2, ...: where the latest earlier occurrence of the last n tokens of ``tail``
        ends, as long as one exists (existence is monotone in n: the first miss ends the list)."""
        ends = []
        for n in range(1, len(tail) + 1):
            end = self._index.get(tuple(tail[-n:]))
            if end is None:
                break
            ends.append(end)
        return ends
