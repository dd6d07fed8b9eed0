"""Fake backends and inventories for engine tests: real threading, no model, behaviour set per test."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

from backends.base import BackendCapabilities, BackendHealth, GenerationRequest, TokenChunk, TokenLogprob
from backends.stream import TokenStream
from plugin.engine.devices import DeviceInfo


def device(kind: str, gb: float = 8.0, simulated: bool = True, index: int = 0) -> DeviceInfo:
    backends = {"gpu": ("torch",), "npu": ("onnxruntime-genai",), "cpu": ("torch", "onnxruntime-genai")}[kind]
    return DeviceInfo(
        kind=kind,
        name=f"fake {kind}",
        memory_bytes=int(gb * 2**30),
        backends=backends,
        providers=("CPUExecutionProvider",),
        simulated=simulated and kind != "cpu",
        index=index,
    )


class WordDecoder:
    """Token i of the reply is its i-th word: enough of a tokenizer for the shared TokenStream."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def add(self, token_id: int) -> str:
        if token_id == FAKE_EOS:
            return ""
        return (" " if token_id else "") + self.words[token_id % len(self.words)]

    def flush(self) -> str:
        return ""


FAKE_EOS = 10_000


class FakeBackend:
    """Replies 'echo: <last user message>' one word per token, through the same TokenStream as real backends.

    It follows the backend contract: prompt tokens are the request's ids, max_new_tokens and stop strings
    are honoured, `cancel` is True only for a request it is running. `gate`, when set, is an Event every
    token from index `hold_after` on waits for, so a test can hold requests in flight without sleeping;
    `fail_load` / `fail_first` make it fail on load or before the first token.
    """

    def __init__(
        self,
        device_kind: str,
        *,
        fail_load: bool = False,
        fail_first: bool = False,
        token_delay_s: float = 0.0,
        capacity: int = 4,
        words: int | None = None,
        gate: threading.Event | None = None,
        hold_after: int = 0,
        kv_budget_bytes: int | None = None,
        kv_bytes_per_token: int = 0,
    ) -> None:
        self.device_kind = device_kind
        self.fail_load = fail_load
        self.fail_first = fail_first
        self.token_delay_s = token_delay_s
        self.capacity = capacity
        self.words = words
        self.gate = gate
        self.hold_after = hold_after
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self.loaded = False
        self.crashed = ""
        self.active: set[str] = set()
        self.cancelled: set[str] = set()
        self.served: list[str] = []
        self.max_running = 0
        self.lock = threading.Lock()

    def load(self) -> None:
        if self.fail_load:
            raise RuntimeError(f"fake {self.device_kind} provider missing")
        self.loaded = True

    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        if self.fail_first:
            raise RuntimeError(f"fake {self.device_kind} device lost")
        content = request.messages[-1]["content"] if request.messages else request.prompt
        words = f"echo: {content}".split(" ")
        if self.words is not None:
            words = (words * self.words)[: self.words]
        prompt_tokens = len(request.prompt_ids) if request.prompt_ids is not None else len(str(content).split())
        stream = TokenStream(request.request_id, prompt_tokens, request.sampling, {FAKE_EOS}, WordDecoder(words))
        with self.lock:
            if request.request_id in self.active:
                raise ValueError(f"request_id {request.request_id!r} is already generating")
            self.active.add(request.request_id)
            self.served.append(request.request_id)
            self.max_running = max(self.max_running, len(self.active))
        top = request.sampling.logprobs
        return self._run(request.request_id, stream, len(words), request.sampling.suppressed_until(), top)

    def _run(
        self, rid: str, stream: TokenStream, n_words: int, no_eos_before: int, top: int | None = None
    ) -> Iterator[TokenChunk]:
        # the words, then EOS; like a runtime's min_length, EOS is not sampled before `no_eos_before` tokens
        tokens = [*range(n_words), *range(n_words, max(no_eos_before, n_words)), FAKE_EOS]
        try:
            for token in tokens:
                while self.gate is not None and token >= self.hold_after and not self.gate.wait(0.01):
                    if rid in self.cancelled:
                        break
                if rid in self.cancelled:
                    yield stream.end("cancelled")
                    return
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                # a made-up distribution when logprobs are asked for: the chosen token is the most likely
                logprob = None if top is None else TokenLogprob(token, -0.25, ((token, -0.25), (399, -2.0))[:top])
                chunk = stream.push(token, logprob)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            with self.lock:
                self.active.discard(rid)

    def cancel(self, request_id: str) -> bool:
        with self.lock:
            if request_id not in self.active:
                return False
            self.cancelled.add(request_id)
            return True

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            name="fake",
            device=self.device_kind,
            provider="CPUExecutionProvider",
            precision="fp32",
            max_batch_size=self.capacity,
            context_length=256,
            simulated=self.device_kind != "cpu",
            kv_budget_bytes=self.kv_budget_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token,
        )

    def health(self) -> BackendHealth:
        if self.crashed:
            return BackendHealth(False, len(self.active), self.crashed)
        return BackendHealth(healthy=self.loaded, active_requests=len(self.active))

    def unload(self) -> None:
        self.loaded = False


class CrashingBackend(FakeBackend):
    """A FakeBackend whose process dies of SIGSEGV, as a native runtime's would, when the prompt asks for it:
    'segfault before' dies before the first token, 'segfault mid' after two tokens. The CPU one never does
    (the steady floor the work falls back to). 'bad request' is refused with a ValueError, as a bad request is."""

    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        content = request.messages[-1]["content"] if request.messages else request.prompt or ""
        if "bad request" in content:
            raise ValueError("the fake backend refuses this request")
        if self.device_kind == "cpu":
            content = ""
        if "segfault before" in content:
            os.kill(os.getpid(), signal.SIGSEGV)
        chunks = super().generate(request)
        if "segfault mid" not in content:
            return chunks
        return self._die_after(chunks, 2)

    @staticmethod
    def _die_after(chunks: Iterator[TokenChunk], n: int) -> Iterator[TokenChunk]:
        for i, chunk in enumerate(chunks):
            if i == n:
                time.sleep(0.2)  # let the chunks already sent reach the parent
                os.kill(os.getpid(), signal.SIGSEGV)
            yield chunk


def crashing_factory(model: object, placement: object, device: DeviceInfo) -> CrashingBackend:
    """A module-level factory (picklable, so an isolated backend's child process can call it)."""
    return CrashingBackend(device.kind, token_delay_s=0.01)
