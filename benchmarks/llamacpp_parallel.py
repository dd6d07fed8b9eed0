"""llama.cpp's own parallel decoding of N sequences, through llama-cpp-python's low-level batch API.

What llama.cpp's `batched` example and its server's parallel slots do, without an HTTP hop: one context
with `n_seq_max = N` and a unified KV cache, the N prompts prefilled as N sequences of one batch, then
one `llama_decode` per step holding one token per sequence; each sequence's next token is the argmax of
its logits (greedy, EOS ignored, so every sequence produces the same count). Timestamps are taken when a
step's logits are read, so a stream's TTFT and time per output token are what a client of that step
would see. llama-cpp-python is the optional `llamacpp` extra; this module imports it only when called.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class StreamTimes:
    """One sequence's token timestamps (seconds after the batch was submitted)."""

    stamps: list[float]

    @property
    def ttft_s(self) -> float:
        return self.stamps[0] if self.stamps else float("nan")

    @property
    def tpot_s(self) -> float:
        n = len(self.stamps)
        return (self.stamps[-1] - self.stamps[0]) / (n - 1) if n > 1 else float("nan")


class ParallelLlama:
    """A llama.cpp model loaded once; `run` decodes N prompts as N sequences of shared batches."""

    def __init__(self, gguf: str, threads: int) -> None:
        import llama_cpp as lc
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's load and graph logs to stderr only on errors
        self.lc, self.threads = lc, threads
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(gguf.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self._ctx: Any = None
        self._ctx_shape: tuple[int, int] = (0, 0)

    def close(self) -> None:
        if self._ctx:
            self.lc.llama_free(self._ctx)
            self._ctx = None
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None

    def _context(self, seqs: int, n_ctx: int) -> Any:
        """A context for `seqs` sequences of `n_ctx` positions in all (reused while large enough)."""
        lc = self.lc
        if self._ctx and self._ctx_shape[0] >= seqs and self._ctx_shape[1] >= n_ctx:
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
            return self._ctx
        if self._ctx:
            lc.llama_free(self._ctx)
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = max(512, n_ctx)
        params.n_ubatch = 512
        params.n_seq_max = seqs
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.threads
        self._ctx = lc.llama_init_from_model(self.model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {seqs} sequences x {n_ctx} positions")
        self._ctx_shape = (seqs, n_ctx)
        return self._ctx

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[StreamTimes]]:
        """Decode every prompt as its own sequence; (wall seconds, per-sequence token times)."""
        lc = self.lc
        seqs = len(prompts)
        n_ctx = -(-(sum(len(p) for p in prompts) + seqs * new_tokens + 64) // 256) * 256
        ctx = self._context(seqs, n_ctx)
        total_prompt = sum(len(p) for p in prompts)
        batch = lc.llama_batch_init(max(total_prompt, seqs), 0, 1)
        times = [StreamTimes([]) for _ in prompts]
        try:
            t0 = time.perf_counter()
            rows: list[int] = []  # the batch index holding each sequence's last position
            n = 0
            for s, ids in enumerate(prompts):
                for j, token in enumerate(ids):
                    self._put(batch, n, token, j, s, j == len(ids) - 1)
                    n += 1
                rows.append(n - 1)
            batch.n_tokens = n
            self._decode(ctx, batch)
            last = self._pick(ctx, rows, times, t0)
            lengths = [len(p) for p in prompts]
            for _ in range(new_tokens - 1):
                for s in range(seqs):
                    self._put(batch, s, last[s], lengths[s], s, True)
                    lengths[s] += 1
                batch.n_tokens = seqs
                self._decode(ctx, batch)
                last = self._pick(ctx, list(range(seqs)), times, t0)
            wall = time.perf_counter() - t0
        finally:
            lc.llama_batch_free(batch)
        return wall, times

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _decode(self, ctx: Any, batch: Any) -> None:
        rc = self.lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {batch.n_tokens} tokens")

    def _pick(self, ctx: Any, rows: list[int], times: list[StreamTimes], t0: float) -> list[int]:
        out = []
        for row in rows:
            ptr = self.lc.llama_get_logits_ith(ctx, row)
            logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
            out.append(int(logits.argmax()))
        now = time.perf_counter() - t0
        for s in range(len(rows)):
            times[s].stamps.append(now)
        return out
