"""Trace replay: the real cascade (``step.py``) run on recorded next-token predictions.

Independent per-position acceptance misses how text behaves: easy stretches (a repeated line,
which MaG copies whole) and hard ones alternate, and a draft always starts where the previous one
failed. Averaging acceptance over every start position over-weights the easy stretches (the
inspection paradox), and the planner would over-estimate long drafts.

For greedy decoding the cascade's behaviour on a prompt is fully determined by each level's
argmax along the way. ``measure.py`` records, for every level and every position of the target's
own output, the top next-token logits after the true prefix; a ``ReplayLevel`` answers
``next_token_logits`` from that record (positions past the true prefix are answered as if the
prefix were true — only drafts that the target will reject anyway see such positions). Running
the real ``CascadeStep`` on replay levels gives, for any configuration, exactly the target steps,
forward calls and tokens run per forward that the real run has; the cost model turns those into
seconds. The planner uses this to rank its best candidates and to predict their speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import CascadeConfig
from ..levels.memo import PrefixMemoLevel
from ..loading import Levels

TOP_K = 8  # logits kept per position: enough for lenient reviews (within a factor l of the top)
FLOOR = -1e4  # logit of every token outside the kept top-k


@dataclass
class Trace:
    """One prompt: its ids, the target's output, and each neural level's top-k logits at every
    output position (row i predicts output token i; one extra row after the last)."""

    prompt_ids: list[int]
    output_ids: list[int]
    top_ids: list[torch.Tensor]  # per neural level (N + 1, TOP_K) long
    top_logits: list[torch.Tensor]  # per neural level (N + 1, TOP_K) float

    def as_dict(self) -> dict:
        return {
            "prompt_ids": self.prompt_ids,
            "output_ids": self.output_ids,
            "top_ids": [x.tolist() for x in self.top_ids],
            "top_logits": [[[round(v, 4) for v in row] for row in x.tolist()] for x in self.top_logits],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Trace:
        return cls(
            list(data["prompt_ids"]),
            list(data["output_ids"]),
            [torch.tensor(x, dtype=torch.long) for x in data["top_ids"]],
            [torch.tensor(x, dtype=torch.float32) for x in data["top_logits"]],
        )


class ReplayRunner:
    """A ``Runner`` that answers from a trace's recorded top logits instead of running a model."""

    runner_name = "replay"
    num_params = 0
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, vocab_size: int, max_positions: int) -> None:
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.calls: list[int] = []  # tokens run by every forward, in order
        self.seconds = 0.0  # spent answering (subtracted from the replay's wall time)
        self._top_ids: torch.Tensor | None = None
        self._top_logits: torch.Tensor | None = None
        self._offset = 0

    def use(self, top_ids: torch.Tensor, top_logits: torch.Tensor, prompt_length: int) -> None:
        self._top_ids, self._top_logits = top_ids, top_logits
        self._offset = prompt_length - 1  # sequence position whose prediction is row 0
        self.calls = []
        self.seconds = 0.0

    def forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        if num_logits == 0:
            return torch.empty(0, self.vocab_size)  # the prefill: nothing to answer
        started = time.perf_counter()
        self.calls.append(len(token_ids))
        first = start + len(token_ids) - num_logits - self._offset
        rows = torch.arange(first, first + num_logits).clamp(0, self._top_ids.shape[0] - 1)
        logits = torch.full((num_logits, self.vocab_size), FLOOR)
        logits.scatter_(1, self._top_ids[rows], self._top_logits[rows])
        self.seconds += time.perf_counter() - started
        return logits  # (num_logits, V)


def make_trace(prompt_ids: list[int], output_ids: list[int], logits: list[torch.Tensor]) -> Trace:
    """From each neural level's (N + 1, V) logits; the target's top choice is forced to be the
    trajectory's token (batched and one-token forwards may differ in the last bits)."""
    top_ids, top_logits = [], []
    for i, x in enumerate(logits):
        values, ids = x.float().topk(TOP_K, dim=-1)  # (N + 1, TOP_K)
        if i == 0:
            for row, token in enumerate(output_ids):
                if int(ids[row, 0]) != token:  # rare: put the trajectory's token on top, once
                    others = [t for t in ids[row].tolist() if t != token][: TOP_K - 1]
                    ids[row] = torch.tensor([token, *others])
                    values[row] = torch.cat([values[row, :1] + 1.0, values[row, 1:]])
        top_ids.append(ids)
        top_logits.append(values)
    return Trace(list(prompt_ids), list(output_ids), top_ids, top_logits)


@dataclass(frozen=True)
class ReplayResult:
    """Counts summed over all traces, and where the replay's own time went."""

    num_tokens: int
    num_steps: int
    forward_tokens: tuple[tuple[int, ...], ...]  # per neural level: tokens run by each forward
    mag_calls: int
    matches: bool  # every replay reproduced the target's output (a sanity check)
    wall_seconds: float  # the whole replay
    answer_seconds: float  # of which in the replay levels (standing in for model forwards)

    def overhead_seconds(self, costs) -> float:
        """Seconds of the cascade's own logic (drafting, MaG, bookkeeping, output): the replay's
        wall time less the stand-in forwards and the reviews the cost tables already include."""
        reviews = sum(costs.review(t) for calls in self.forward_tokens for t in calls) if costs.review else 0.0
        return max(0.0, self.wall_seconds - self.answer_seconds - reviews)

    def seconds(self, costs) -> float:
        """Predicted seconds of the real run: measured forward costs plus the measured overhead."""
        total = self.overhead_seconds(costs)
        for level, calls in zip(costs.levels, self.forward_tokens):
            total += sum(level(t) for t in calls)
        return total

    def tokens_per_second(self, costs) -> float:
        return self.num_tokens / self.seconds(costs)

    def speedup(self, costs) -> float:
        return costs.plain_seconds_per_token * self.num_tokens / self.seconds(costs)

    @property
    def tokens_per_step(self) -> float:
        return self.num_tokens / self.num_steps


class Replayer:
    """Replays configurations of one family on a set of traces."""

    def __init__(self, traces: list[Trace], names: list[str], vocab_size: int, mag_bigram=None, mag: bool = True):
        self.traces = traces
        self.names = names  # neural level names, target first
        self.vocab_size = vocab_size
        self.mag_bigram = mag_bigram
        self.mag = mag
        max_positions = max(len(t.prompt_ids) + len(t.output_ids) for t in traces) + 64
        self.runners = [ReplayRunner(vocab_size, max_positions) for _ in names]
        levels = [PrefixMemoLevel(name, runner) for name, runner in zip(names, self.runners)]
        self.levels = Levels(levels[0], tuple(levels[1:]), None, frozenset(), mag_bigram, tuple(names))

    def predict(self, rows, lenience: float, costs, mag_first: int | None = None):
        """The replay as a planner ``Prediction`` (seconds from the cost model)."""
        from .planner import Prediction

        result = self.run(rows, lenience, mag_first)
        steps = result.num_steps
        forwards = [len(calls) / steps for calls in result.forward_tokens]
        if self.mag:
            forwards.append(result.mag_calls / steps)
        target_calls = result.forward_tokens[0]
        draft_length = sum(target_calls) / len(target_calls) - 1 if target_calls else 0.0
        rows = tuple(tuple(row) for row in rows)
        return Prediction(
            rows,
            lenience,
            result.tokens_per_step,
            result.seconds(costs) / steps,
            costs.plain_seconds_per_token,
            tuple(forwards),
            draft_length,
        )

    def run(self, rows, lenience: float = 1.0, mag_first: int | None = None) -> ReplayResult:
        """Replay K (over all levels, zero = unused; () = plain decoding) on every trace, with
        MaG-first gating at ``mag_first`` (MaG is then kept even if K does not use it)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: thread synchronisation would dominate
        try:
            return self._run(rows, lenience, mag_first)
        finally:
            torch.set_num_threads(threads)

    def _run(self, rows, lenience: float, mag_first: int | None) -> ReplayResult:
        from ..cascade import Cascade
        from .planner import reduce

        num_drafting = len(self.names) - 1 + int(self.mag)
        mag_level = num_drafting if self.mag else None
        if mag_level is None or not rows:
            mag_first = None
        if rows and (any(rows[0]) or mag_first is not None):  # K = 0 with MaG first: plain but gated
            used, reduced = reduce(rows, keep=(mag_level,) if mag_first is not None else ())
        else:
            used, reduced = [], []
        with_mag = mag_level in used
        config = CascadeConfig(
            target=self.names[0],
            drafters=tuple(self.names[v] for v in used if v != mag_level),
            mag=with_mag,
            k_matrix=reduced,
            lenience=lenience,
            adaptive=False,
            mag_first=mag_first,
        )
        cascade = Cascade(self.levels, config)
        num_tokens = num_steps = mag_calls = 0
        answer_seconds = 0.0
        calls = [[] for _ in self.runners]
        matches = True
        started = time.perf_counter()
        for trace in self.traces:
            for i, runner in enumerate(self.runners):
                runner.use(trace.top_ids[i], trace.top_logits[i], len(trace.prompt_ids))
            result = cascade.generate(trace.prompt_ids, len(trace.output_ids), ignore_eos=True)
            matches &= result.token_ids == trace.output_ids
            num_tokens += result.stats.num_new_tokens
            num_steps += result.stats.num_target_steps
            for runner, sink in zip(self.runners, calls):
                sink.extend(runner.calls)
                answer_seconds += runner.seconds
            if with_mag:
                mag_calls += result.stats.levels[-1].num_forwards
        wall = time.perf_counter() - started
        return ReplayResult(
            num_tokens, num_steps, tuple(tuple(c) for c in calls), mag_calls, matches, wall, answer_seconds
        )
