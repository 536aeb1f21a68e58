"""``WindowedLevel``: a drafter that reads only the end of the prompt.

Why: on llama.cpp levels a generation's prompt prefill is a third of its time, and every drafter
prefills the whole prompt too (measured on pycode, 378 prompt tokens, AMD EPYC, 2 threads:
pycode-1m 11 ms, pycode-5m 24 ms, against 105 ms for the target). A drafter only proposes tokens
that the target verifies, so what it conditions on changes speed, never the output: this wrapper
drops all but the last ``window`` prompt tokens for the drafter it wraps. The cut is fixed when a
generation starts (the first prefill or call after ``reset``), so the wrapped level sees one
growing sequence and its prefix memo (rollback, catch-up) works unchanged; positions restart at 0
there (a model trained on documents that start anywhere reads a cut prompt as such a document).

Never wrap the target: its logits are the output.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import NEURAL, LevelCounters, NeuralLevel


class WindowedLevel:
    """A neural drafter over the last ``window`` tokens of the prompt (plus everything after it)."""

    kind = NEURAL

    def __init__(self, level: NeuralLevel, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"a drafter's prompt window must be a positive integer, got {window!r}")
        self.level = level
        self.window = window
        self.name = level.name
        self.vocab_size = level.vocab_size
        self.max_positions = level.max_positions
        self.num_params = level.num_params
        self.runner_name = level.runner_name
        self.device = level.device
        self.runner = getattr(level, "runner", None)  # the profile times the backend through it
        self._cut: int | None = None  # tokens dropped from the front, fixed per generation

    @property
    def counters(self) -> LevelCounters:
        return self.level.counters

    def reset(self) -> None:
        self.level.reset()
        self._cut = None

    def prefill(self, ids: list[int]) -> None:
        if self._cut is None:
            self._cut = max(0, len(ids) - self.window)
        self.level.prefill(ids[self._cut :])

    def next_token_logits(self, ids: list[int], num_positions: int) -> torch.Tensor:
        if self._cut is None:  # no prefill this generation: cut before the rows asked for
            self._cut = max(0, len(ids) - num_positions - self.window)
        return self.level.next_token_logits(ids[self._cut :], num_positions)
