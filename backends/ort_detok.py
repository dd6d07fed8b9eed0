"""Streaming detokenization for the onnxruntime-genai backend: transformers' text, at a per-token cost of ~1 us.

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
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from backends.textstream import IncrementalDetokenizer

log = logging.getLogger(__name__)


class StreamDecoder(Protocol):
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
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._table = self._byte_table(json.loads(Path(tokenizer_json).read_text(encoding="utf-8")))
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

    def stream(self, prompt_ids: list[int]) -> StreamDecoder:
        if self._table is not None:
            return _ByteStream(self._table)
        return _WindowStream(self._tokenizer, prompt_ids)

    def decode(self, ids: list[int]) -> str:
        """Whole-reply decode, for comparisons."""
        return self._tokenizer.decode(ids, skip_special_tokens=True)
