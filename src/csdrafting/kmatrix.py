"""The K-matrix: how many draft positions each drafter fills for each reviewer.

Convention (the CS Drafting paper's, as in its reference code). Number the drafting levels
``d1 .. dn`` from the largest neural drafter down to MaG (MaG, when on, is always ``dn``).
K is an ``n x n`` upper-triangular matrix of non-negative integers:

* row 0 belongs to the target, row ``r >= 1`` to drafter ``dr`` acting as a reviewer;
* column ``c`` belongs to drafter ``d(c+1)``;
* ``K[r][c]`` (``c >= r``) is how many positions ``d(c+1)`` fills in a draft that row ``r``'s
  reviewer checks. Entries below the diagonal are unused and must be 0.

Horizontal cascade: a reviewer's draft is filled left to right, larger drafters first. Drafter
``d(c+1)`` keeps producing tokens until the draft holds ``K[r][0] + ... + K[r][c]`` tokens (it may
overshoot by the tokens of its last review; those are kept, as in the paper), then the next
smaller drafter takes over. Vertical cascade: a neural drafter produces its tokens by reviewing a
draft built, recursively, from row ``c + 1`` (its own row as a reviewer); the smallest neural
drafter with no row (MaG off) decodes autoregressively, one token per forward.

Worked example: drafters pycode-5m (d1), pycode-1m (d2) and MaG (d3), ::

    K = [[2, 1, 3],    # target:     d1 fills positions 1-2, d2 up to 3, MaG up to 6
         [0, 1, 2],    # d1 reviews:  d2 fills position 1, MaG up to 3
         [0, 0, 3]]    # d2 reviews:  MaG fills 3 positions

One target step: d1 must draft 2 tokens. It asks d2 for a draft of (1 + 2) tokens; d2 makes its
1 token by reviewing 3 MaG tokens (say it accepts 2 and adds its own: 3 tokens, overshooting its
1 and keeping all), MaG then sees d2's row already full. d1 reviews those 3 tokens in one forward
and keeps, say, 1 plus its own correction: 2 tokens, d1's share is done. d2 then continues the
draft to 3 positions (one more review of MaG proposals), MaG fills it to 6, and the target
verifies all 6 in one forward. With one drafter and MaG off, ``K = [[k]]`` is plain speculative
decoding with draft length k; with MaG alone it is prompt-lookup decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate

from .errors import ConfigError

MAX_ENTRY = 256


@dataclass(frozen=True)
class KMatrix:
    rows: tuple[tuple[int, ...], ...]  # (n, n), upper triangular

    @property
    def size(self) -> int:
        return len(self.rows)

    def cumulative(self, reviewer: int) -> list[int]:
        """Draft lengths at which each drafter's share ends, for reviewer row ``reviewer``;
        entry ``c`` belongs to drafter ``d(c+1)`` (columns before ``reviewer`` are 0)."""
        return list(accumulate(self.rows[reviewer]))

    def as_lists(self) -> list[list[int]]:
        return [list(row) for row in self.rows]

    def __str__(self) -> str:
        return json.dumps(self.as_lists())

    @classmethod
    def parse(cls, value, num_drafters: int) -> KMatrix:
        """Accept a KMatrix, nested lists, a JSON string ``"[[2,1,3],[0,1,2],[0,0,3]]"`` or the
        upper-triangle shorthand ``"2,1,3;1,2;3"`` (row r lists columns r..n-1)."""
        if isinstance(value, KMatrix):
            rows = value.as_lists()
        elif isinstance(value, str):
            rows = _parse_text(value)
        elif isinstance(value, (list, tuple)):
            rows = [list(row) if isinstance(row, (list, tuple)) else row for row in value]
        else:
            raise ConfigError(f"K-matrix must be a list of rows or a string, got {type(value).__name__}")
        return cls(_validate(rows, num_drafters))

    @classmethod
    def default(cls, num_neural: int, mag: bool) -> KMatrix:
        """A starting point for any number of drafters, meant to be adapted online (``"auto"``) or
        replaced by a measured one (``csd tune``).

        The target gets a short prefix from each neural drafter, largest first, and a MaG tail;
        every neural reviewer gets its smaller neighbour's single token plus MaG tokens.
        """
        n = num_neural + int(mag)
        rows = [[0] * n for _ in range(n)]
        for r in range(n):
            for c in range(r, n):
                is_mag = mag and c == n - 1
                if r == 0:
                    rows[r][c] = 4 if is_mag else (2 if c == 0 else 1)
                else:
                    rows[r][c] = 3 if is_mag else 1
        if num_neural == 0 and mag:
            rows = [[8]]
        elif num_neural == 1 and not mag:
            rows = [[4]]
        return cls(tuple(tuple(row) for row in rows))


def _parse_text(text: str) -> list:
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"K-matrix is not valid JSON: {exc.msg} (got {text!r})") from None
    rows = [part.strip() for part in text.split(";")]
    n = len(rows)
    parsed = []
    for r, part in enumerate(rows):
        try:
            entries = [int(x) for x in part.split(",")] if part else []
        except ValueError:
            raise ConfigError(f"K-matrix row {r} ({part!r}) must be comma-separated integers") from None
        if len(entries) != n - r:
            raise ConfigError(
                f"K-matrix shorthand row {r} must list columns {r}..{n - 1} ({n - r} numbers), got {len(entries)}"
            )
        parsed.append([0] * r + entries)
    return parsed


def _validate(rows: list, num_drafters: int) -> tuple[tuple[int, ...], ...]:
    n = num_drafters
    if n == 0:
        if rows not in ([], [[]]):
            raise ConfigError("K-matrix must be empty when there are no drafters (plain decoding)")
        return ()
    if len(rows) != n or any(not isinstance(row, list) or len(row) != n for row in rows):
        shape = f"{len(rows)} rows" if not all(isinstance(r, list) for r in rows) else f"{[len(r) for r in rows]}"
        raise ConfigError(
            f"K-matrix must be {n}x{n} (one row for the target and each neural reviewer, one column "
            f"per drafter including MaG), got {shape}"
        )
    for r, row in enumerate(rows):
        for c, entry in enumerate(row):
            if isinstance(entry, bool) or not isinstance(entry, int):
                raise ConfigError(f"K-matrix entry [{r}][{c}] must be an integer, got {entry!r}")
            if entry < 0 or entry > MAX_ENTRY:
                raise ConfigError(f"K-matrix entry [{r}][{c}] must be in 0..{MAX_ENTRY}, got {entry}")
            if c < r and entry != 0:
                raise ConfigError(
                    f"K-matrix entry [{r}][{c}] is below the diagonal (a drafter cannot draft for a "
                    f"smaller one) and must be 0, got {entry}"
                )
    return tuple(tuple(row) for row in rows)
