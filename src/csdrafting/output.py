"""Where emitted tokens become output: the one place truncation happens.

A step may emit several tokens at once (accepted draft tokens plus a recovered or bonus token),
so any of them can cross a limit. ``OutputCollector.push`` keeps tokens up to and including the
first EOS (unless EOS is ignored), never more than ``max_new_tokens``, and stops at the token
that completes a stop string (the text is cut before the stop string; the token ids keep that
last token, whose text the cut removed).

It also turns what was kept into ``StreamChunk``s, the one event type a generation yields, and
``GenerationResult`` is what ``Cascade.generate`` concatenates from them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .stats import GenerationStats


@dataclass(frozen=True)
class StreamChunk:
    """A piece of output: consecutive tokens first proposed by the same level.

    ``level`` names that level (the target's name for tokens the target produced itself). The
    last chunk of a generation carries ``finish_reason`` and ``stats`` (its text may be empty).
    """

    text: str
    token_ids: list[int]
    level: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass(frozen=True)
class GenerationResult:
    """token_ids: the new tokens only (EOS included when it ended the generation)."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "eos", "length" or "stop"
    stats: GenerationStats

    def as_dict(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats.as_dict(),
        }

    @classmethod
    def from_chunks(cls, chunks) -> GenerationResult:
        token_ids: list[int] = []
        pieces: list[str] = []
        for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            pieces.append(chunk.text)
        return cls(token_ids, "".join(pieces), chunk.finish_reason, chunk.stats)


class IncrementalDetokenizer:
    """Text pieces for tokens as they arrive, without re-decoding the whole output each time.

    Decodes a short window (the previous piece's tokens plus the new ones) and emits only what
    the new tokens added; a piece that ends in an incomplete UTF-8 sequence is held back until
    the next token completes it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += piece
            return piece
        return ""


class OutputCollector:
    """Accumulates a generation's new tokens, applying every stopping rule."""

    def __init__(
        self,
        tokenizer,
        max_new_tokens: int,
        eos_ids: frozenset[int],
        ignore_eos: bool,
        stop: tuple[str, ...] = (),
        track_text: bool = False,
    ) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos_ids = frozenset() if ignore_eos else eos_ids
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.origins: list[int] = []
        self.piece_lengths: list[int] = []  # characters of text each token added (when tracked)
        self.finish_reason: str | None = None
        self.stop_text_end: int | None = None  # where the text is cut when a stop string matched
        self.tokenizer = tokenizer
        self.track_text = track_text
        self.detokenizer = IncrementalDetokenizer(tokenizer) if (track_text or self.stop) else None
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._shown = 0  # characters of text already put in chunks

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.token_ids)

    def push(self, tokens: list[int], origins: list[int], names: list[str]) -> list[StreamChunk]:
        """Add a step's tokens (a prefix of them is kept); returns the chunks they make, one per
        run of tokens from the same level. Their text is what may be shown so far when text is
        tracked (streaming), else empty until ``finish``."""
        text_before = len(self.detokenizer.text) if self.track_text else 0
        kept = self._keep(tokens, origins)
        first = len(self.token_ids) - kept
        chunks = []
        text_end = text_before
        visible = self.safe_text_length() if self.track_text else 0
        for begin, end, origin in _runs(self.origins, first):
            piece = ""
            if self.track_text:
                text_end += sum(self.piece_lengths[begin:end])
                shown_end = min(text_end, visible)
                piece = self.detokenizer.text[self._shown : shown_end] if shown_end > self._shown else ""
                self._shown = max(self._shown, shown_end)
            chunks.append(StreamChunk(piece, self.token_ids[begin:end], names[origin]))
        return chunks

    def finish(self, level: str, stats: GenerationStats) -> StreamChunk:
        """The last chunk: the text not yet shown, the finish reason and the statistics."""
        text = self.final_text() if self.tokenizer is not None else ""
        return StreamChunk(text[self._shown :], [], level, self.finish_reason, stats)

    def _keep(self, tokens: list[int], origins: list[int]) -> int:
        kept = 0
        for token, origin in zip(tokens, origins):
            if self.finish_reason is not None:
                break
            self.token_ids.append(token)
            self.origins.append(origin)
            kept += 1
            if self.detokenizer is not None:
                before = len(self.detokenizer.text)
                self.piece_lengths.append(len(self.detokenizer.add(token)))
                if self.stop and self._check_stop(before):
                    self.finish_reason = "stop"
                    break
            if token in self.eos_ids:
                self.finish_reason = "eos"
            elif len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        return kept

    def _check_stop(self, before: int) -> bool:
        text = self.detokenizer.text
        window_start = max(0, before - self._max_stop + 1)
        hits = [i for i in (text.find(s, window_start) for s in self.stop) if i >= 0]
        if hits:
            self.stop_text_end = min(hits)
            return True
        return False

    def safe_text_length(self) -> int:
        """How much of the text so far can be shown: a stop string may still be forming at the end."""
        text = self.detokenizer.text
        if self.stop_text_end is not None:
            return self.stop_text_end
        if self.finish_reason is not None:
            return len(text)
        for keep in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-keep:]
            if any(s.startswith(tail) for s in self.stop):
                return len(text) - keep
        return len(text)

    def final_text(self) -> str:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stop_text_end is not None:
            text = text[: self.stop_text_end]
        return text


def _runs(origins: list[int], start: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, origin) of each run of equal origins in ``origins[start:]``."""
    begin = start
    for i in range(start + 1, len(origins) + 1):
        if i == len(origins) or origins[i] != origins[begin]:
            yield begin, i, origins[begin]
            begin = i
