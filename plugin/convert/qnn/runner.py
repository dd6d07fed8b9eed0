"""A small Python driver of the pipeline with plain onnxruntime sessions, windowed exactly as genai does it.

Calibration needs the transformer graphs' inputs on real prompts, and parity needs logits at every
position (teacher forcing) from the very graphs a device runs; onnxruntime-genai gives neither (it only
exposes the last position's logits and cuts windows internally). The windowing here copies genai 0.18's
`decoder-pipeline` with `sliding_window.alignment = "left"`: the prompt is padded on the right to a
multiple of the window with `pad_token_id`; window k runs with `past_seq_len = (k + 1) * window - 1`;
decode steps run the iterator with `past_seq_len` = the token's position; `total_seq_len` is the KV
buffer length. The tests check this driver against genai itself.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plugin.convert.qnn.graphs import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE


@dataclass
class PipelineShape:
    layers: int
    kv_heads: int
    head_dim: int
    window: int
    context_length: int
    pad_token_id: int


class PipelineRunner:
    """Runs embeddings -> context/iterator -> lm_head over its own static KV buffers (batch 1)."""

    def __init__(
        self,
        shape: PipelineShape,
        embeddings: Any,
        context: Any,
        iterator: Any | None,
        lm_head: Any,
    ) -> None:
        self.shape = shape
        self.embeddings, self.context, self.iterator, self.lm_head = embeddings, context, iterator, lm_head
        self._emb_inputs = {i.name for i in embeddings.get_inputs()}
        self.reset()

    def reset(self) -> None:
        s = self.shape
        kv = (1, s.kv_heads, s.context_length, s.head_dim)
        self.kv = {}
        for i in range(s.layers):
            self.kv[PAST_KEY % i] = np.zeros(kv, np.float32)
            self.kv[PAST_VALUE % i] = np.zeros(kv, np.float32)
        self.length = 0  # tokens in the KV buffer

    def _embed(self, ids: np.ndarray, past_seq_len: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids.astype(np.int32)[None]}
        if "past_seq_len" in self._emb_inputs:
            feeds["past_seq_len"] = past_seq_len
        return self.embeddings.run(None, feeds)[0]

    def _feeds(self, hidden: np.ndarray, past_seq_len: int) -> dict[str, np.ndarray]:
        return {
            "input_hidden_states": hidden,
            "past_seq_len": np.array([[past_seq_len]], np.int32),
            "total_seq_len": np.array([self.shape.context_length], np.int32),
            **self.kv,
        }

    def _run(self, session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(None, feeds), strict=True))
        for i in range(self.shape.layers):
            self.kv[PAST_KEY % i] = outs[PRESENT_KEY % i]
            self.kv[PAST_VALUE % i] = outs[PRESENT_VALUE % i]
        return outs["output_hidden_states"]

    def prefill_steps(self, ids: list[int]) -> Generator[tuple[str, dict[str, np.ndarray]], None, np.ndarray]:
        """Like prefill, yielding ("context", feeds) before each window runs (calibration reads them)."""
        s = self.shape
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) > s.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the context length {s.context_length}")
        self.reset()
        padded = np.full(-(-len(ids) // s.window) * s.window, s.pad_token_id, np.int64)
        padded[: len(ids)] = ids
        rows = []
        for k in range(len(padded) // s.window):
            chunk = padded[k * s.window : (k + 1) * s.window]
            past = (k + 1) * s.window - 1
            feeds = self._feeds(self._embed(chunk, np.array([[past]], np.int32)), past)
            yield "context", feeds
            out = self._run(self.context, feeds)
            rows.append(self.lm_head.run(None, {"output_hidden_states": out})[0][0])
        self.length = len(ids)
        return np.concatenate(rows)[: len(ids)]

    def decode_steps(self, token: int) -> Generator[tuple[str, dict[str, np.ndarray]], None, np.ndarray]:
        """Like decode, yielding ("iterator", feeds) before the step runs."""
        if self.iterator is None:
            raise ValueError("this runner has no iterator session")
        if self.length >= self.shape.context_length:
            raise ValueError(f"the context length {self.shape.context_length} is full")
        feeds = self._feeds(self._embed(np.array([token]), np.array([[self.length]], np.int32)), self.length)
        yield "iterator", feeds
        out = self._run(self.iterator, feeds)
        self.length += 1
        return self.lm_head.run(None, {"output_hidden_states": out})[0][0, -1]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Process `ids` from an empty cache in windows; return logits for every position [len(ids), vocab]."""
        return _drain(self.prefill_steps(ids))

    def decode(self, token: int) -> np.ndarray:
        """Append one token through the iterator; return its logits [vocab]."""
        return _drain(self.decode_steps(token))

    def greedy(self, ids: list[int], new_tokens: int, eos: set[int] | None = None) -> list[int]:
        """Greedy continuation (prefill, then the iterator); returns the new tokens only."""
        logits = self.prefill(ids)[-1]
        out: list[int] = []
        for _ in range(new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if (eos and token in eos) or self.length >= self.shape.context_length:
                break
            logits = self.decode(token)
        return out


def _drain(steps: Generator[Any, None, np.ndarray]) -> np.ndarray:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def cpu_session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
