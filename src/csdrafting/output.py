"""Where emitted tokens become output: the one place truncation happens.

A step may emit several tokens at once (accepted draft tokens plus a recovered or bonus token),
so any of them can cross a limit. ``OutputCollector.push`` keeps tokens up to and including the
first EOS (unless EOS is ignored), never more than ``max_new_tokens``, and stops at the token
that completes a stop string (the text is cut before the stop string; the token ids keep that
last token, whose text the cut removed).
"""

from __future__ import annotations


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
        self.detokenizer = IncrementalDetokenizer(tokenizer) if (track_text or self.stop) else None
        self._max_stop = max((len(s) for s in self.stop), default=0)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.token_ids)

    def push(self, tokens: list[int], origins: list[int]) -> int:
        """Add a step's tokens; returns how many were kept (a prefix of ``tokens``)."""
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

    def final_text(self, tokenizer) -> str:
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stop_text_end is not None:
            text = text[: self.stop_text_end]
        return text
