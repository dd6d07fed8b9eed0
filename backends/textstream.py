"""Streaming text helpers shared by every backend: stop-string matching and UTF-8-safe detokenization.

Both solve the same problem: a stream must never emit text it may have to take back. A stop string can
arrive split over several tokens, so the tail that could still grow into one is held back; a byte-level
token can end in the middle of a multi-byte character, so text ending in U+FFFD is held back until the
character completes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_PREFIX_WINDOW = 5
"""Tokens of context decoded before the new ones, so tokenizers that merge or strip leading spaces at
the start of a decode (SentencePiece) produce the same characters as in a full decode."""


class StopStringMatcher:
    """Feeds text pieces, returns text safe to emit now; holds back a tail that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        bad = [s for s in stops if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty strings (got {bad!r}); drop empty entries")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._buffer = ""
        self.stopped = False
        self.matched: str | None = None
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped). After a stop, the stop string and all later text are dropped."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._buffer + text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, stop)
        if first is not None:
            self.stopped, self.matched, self._buffer = True, first[1], ""
            return buf[: first[0]], True
        hold = self._held_tail(buf)
        self._buffer = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text at the end of the stream (it never completed a stop string)."""
        out, self._buffer = self._buffer, ""
        return "" if self.stopped else out

    def _held_tail(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


class IncrementalDetokenizer:
    """UTF-8-safe streaming decode for HF tokenizers: never emits a partial multi-byte char (U+FFFD) mid-stream.

    The vLLM/TGI scheme: decode ids[prefix_offset:read_offset] (already emitted context) and
    ids[prefix_offset:] (context plus new tokens); the new text is the difference. While the full decode
    ends in U+FFFD the new tokens hold an incomplete character, so nothing is emitted and the offsets
    stay put until it completes.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(t) for t in prompt_ids[-_PREFIX_WINDOW:]] if len(prompt_ids) else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.token_count = 0

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be '' while a character is partial)."""
        self._ids.append(int(token_id))
        self.token_count += 1
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (an incomplete character stays as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        ids = self._ids
        if self._read_offset >= len(ids):
            return ""
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(ids[self._prefix_offset :])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR)):
            # An incomplete character, or a token that adds no text (a skipped special token): keep the
            # window as it is so the next token is decoded with the same context.
            return ""
        new_text = full_text[len(prefix_text) :]
        self._commit()
        return new_text

    def _commit(self) -> None:
        """Move the window forward: the tokens just emitted become the context for the next decode."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
