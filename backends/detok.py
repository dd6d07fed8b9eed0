"""Streaming detokenization shared by every backend: transformers' text, UTF-8-safe, ~1 us per token.

Streamed text must equal `transformers` `decode(ids, skip_special_tokens=True)` of the whole reply,
including replies that are not valid UTF-8 (onnxruntime-genai's own TokenizerStream silently drops an
incomplete tail and collapses invalid bytes differently). For byte-level BPE tokenizers (GPT-2 style:
the default model's and the test models') each token is a fixed byte string, so an incremental UTF-8
decoder with errors="replace" reproduces the Rust ByteLevel decoder exactly (same maximal-subpart
replacement) without re-decoding a window per token. Other tokenizers use the windowed
IncrementalDetokenizer over the `tokenizers` library, which costs two small decodes per token.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


REPLACEMENT_CHAR = "\ufffd"
_PREFIX_WINDOW = 5
"""Tokens of context decoded before the new ones, so tokenizers that merge or strip leading spaces at
the start of a decode (SentencePiece) produce the same characters as in a full decode."""


class StreamDecoder(Protocol):
    """One reply's decoder: `add` returns the text a token completes, `flush` what is held at the end."""

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-unicode table, char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class _ByteStream:
    """One reply's stream over a ByteLevelTable."""

    __slots__ = ("_bytes", "_decoder")

    def __init__(self, token_bytes: list[bytes | None]) -> None:
        self._bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        data = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else None
        return self._decoder.decode(data) if data else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class _WindowStream:
    """Any other tokenizer: the shared windowed detokenizer over the `tokenizers` library."""

    __slots__ = ("_inner",)

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._inner = IncrementalDetokenizer(_HFDecodeSignature(tokenizer), prompt_ids)

    def add(self, token_id: int) -> str:
        return self._inner.add(token_id)

    def flush(self) -> str:
        return self._inner.flush()


class _HFDecodeSignature:
    """`tokenizers.Tokenizer` behind the transformers decode signature IncrementalDetokenizer calls."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class Detokenizer:
    """Per-model factory of per-reply stream decoders, built from the export's tokenizer.json."""

    def __init__(self, tokenizer_json: Path) -> None:
        self._init(Path(tokenizer_json).read_text(encoding="utf-8"))

    @classmethod
    def from_json(cls, spec: str) -> Detokenizer:
        """From the JSON text of a `tokenizers.Tokenizer` (e.g. a transformers fast tokenizer's backend)."""
        self = cls.__new__(cls)
        self._init(spec)
        return self

    def _init(self, spec: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(spec)
        self._table = self._byte_table(json.loads(spec))
        self.kind = "byte-level" if self._table is not None else "windowed"

    def _byte_table(self, spec: dict[str, Any]) -> list[bytes | None] | None:
        """id -> bytes for a byte-level BPE tokenizer (special tokens -> None), else None."""
        decoder = spec.get("decoder") or {}
        if decoder.get("type") != "ByteLevel" or (spec.get("model") or {}).get("type") != "BPE":
            return None
        vocab: dict[str, int] = spec["model"].get("vocab") or {}
        added = {t["id"]: t for t in spec.get("added_tokens") or []}
        size = max([*vocab.values(), *added.keys(), -1]) + 1
        table: list[bytes | None] = [None] * size
        byte_of = _byte_decoder()
        for token, i in vocab.items():
            table[i] = self._token_bytes(token, byte_of)
        for i, t in added.items():
            table[i] = None if t.get("special") else self._token_bytes(t["content"], byte_of)
        return table

    @staticmethod
    def _token_bytes(token: str, byte_of: dict[str, int]) -> bytes:
        # As the Rust ByteLevel decoder: map every char through the table, or keep the token's own UTF-8.
        try:
            return bytes(byte_of[c] for c in token)
        except KeyError:
            return token.encode("utf-8")

    def __call__(self, prompt_ids: list[int]) -> StreamDecoder:
        return self.stream(prompt_ids)

    def stream(self, prompt_ids: list[int]) -> StreamDecoder:
        if self._table is not None:
            return _ByteStream(self._table)
        return _WindowStream(self._tokenizer, prompt_ids)

    def decode(self, ids: list[int]) -> str:
        """Whole-reply decode, for comparisons."""
        return self._tokenizer.decode(ids, skip_special_tokens=True)


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


def decoder_factory(tokenizer: Any) -> Detokenizer | Callable[[list[int]], StreamDecoder]:
    """Per-reply decoders for a transformers tokenizer: the byte-level fast path when its backend allows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return Detokenizer.from_json(backend.to_str())
    return lambda prompt_ids: IncrementalDetokenizer(tokenizer, prompt_ids)
