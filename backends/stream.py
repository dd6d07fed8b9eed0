"""The one streaming state machine every backend feeds: token ids in, TokenChunks out.

A backend only samples tokens; `TokenStream` decides everything a caller sees: the text each token
completes (UTF-8-safe, through a `StreamDecoder`), stop strings matched across chunk boundaries (text
that could still become a stop string is held back), EOS, `max_new_tokens`, cancellation, and how tokens
are counted. Every sampled token counts as generated, the EOS token included (it cost a decode step, and
vLLM counts it the same way), so `usage.completion_tokens` is the same whichever backend served a request.
vLLM's extensions mean what they mean there: `ignore_eos` (EOS does not end the reply), `stop_token_ids`
(end it, their own text kept), `min_tokens` (nothing ends it earlier). Runtimes also keep EOS from being sampled
early where they can (onnxruntime-genai's min_length, a logits mask in torch); this class decides alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from backends.base import FinishReason, SamplingParams, TokenChunk, TokenLogprob
from backends.detok import StreamDecoder


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


def token_logprob(logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """`token`'s log-probability under softmax(`logits`) (one row, [vocab]) and the `top_n` most likely tokens."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = row - row.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        best = np.argpartition(-logprobs, top_n - 1)[:top_n]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = tuple((int(i), float(logprobs[i])) for i in best)
    return TokenLogprob(int(token), float(logprobs[token]), top)


class TokenStream:
    """One request's stream: `push` each sampled token, `end` when the runtime stops for its own reason."""

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        sampling: SamplingParams,
        eos_ids: Collection[int],
        decoder: StreamDecoder,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = sampling.max_new_tokens
        self.min_tokens = sampling.min_tokens
        self.eos_ids = frozenset() if sampling.ignore_eos else frozenset(eos_ids)
        self.stop_ids = frozenset(sampling.stop_token_ids) - self.eos_ids
        self.decoder = decoder
        self.stops = StopStringMatcher(sampling.stop)
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._logprob: TokenLogprob | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.generated)

    def push(self, token: int, logprob: TokenLogprob | None = None) -> TokenChunk:
        """Account one sampled token; the returned chunk carries finish_reason when it ended the stream."""
        if self.done:
            raise RuntimeError(f"request {self.request_id}: token pushed after the stream finished")
        token = int(token)
        self._logprob = logprob
        self.generated.append(token)
        may_stop = len(self.generated) > self.min_tokens
        if token in self.eos_ids and may_stop:
            return self._close([token], "", "stop")
        piece = self.decoder.add(token)
        if not may_stop:  # before min_tokens no stop string ends the reply (vLLM's rule); text passes through
            text, stopped = self.stops.flush() + piece, False
        else:
            text, stopped = self.stops.feed(piece)
        if stopped:
            return self._chunk([token], text, "stop")
        if token in self.stop_ids and may_stop:  # as vLLM: a stop token's own text stays in the reply
            return self._close([token], text, "stop")
        if self.remaining <= 0:
            return self._close([token], text, "length")
        return self._chunk([token], text, None)

    def end(self, reason: FinishReason, error: str | None = None) -> TokenChunk:
        """Finish without a new token: the runtime hit its own limit ("length"), a cancel, or an error.

        Held-back text is released for "length"/"stop"; a cancelled or failed stream drops it.
        """
        if self.done:
            raise RuntimeError(f"request {self.request_id}: stream already finished ({self.finish_reason})")
        if reason in ("cancelled", "error"):
            return self._chunk([], "", reason, error)
        return self._close([], "", reason)

    def _close(self, token_ids: list[int], text: str, reason: FinishReason) -> TokenChunk:
        """Release what the decoder and the stop matcher still hold; a stop string found there wins."""
        tail, stopped = self.stops.feed(self.decoder.flush())
        text += tail
        if stopped:
            return self._chunk(token_ids, text, "stop")
        return self._chunk(token_ids, text + self.stops.flush(), reason)

    def _chunk(
        self, token_ids: list[int], text: str, reason: FinishReason | None, error: str | None = None
    ) -> TokenChunk:
        self.finish_reason = reason
        logprobs = [self._logprob] if token_ids and self._logprob is not None else None
        self._logprob = None
        return TokenChunk(self.request_id, text, token_ids, reason, self.prompt_tokens, error, logprobs)
