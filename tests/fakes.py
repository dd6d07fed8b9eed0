"""Fake backends and inventories for engine tests: real threading, no model, behaviour set per test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from backends.base import BackendCapabilities, BackendHealth, GenerationRequest, TokenChunk
from plugin.devices import DeviceInfo


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


class FakeBackend:
    """Replies 'echo: <last user message>' one word per token; can fail on load or before the first token."""

    def __init__(
        self,
        device_kind: str,
        *,
        fail_load: bool = False,
        fail_first: bool = False,
        token_delay_s: float = 0.0,
        capacity: int = 4,
        words: int | None = None,
    ) -> None:
        self.device_kind = device_kind
        self.fail_load = fail_load
        self.fail_first = fail_first
        self.token_delay_s = token_delay_s
        self.capacity = capacity
        self.words = words
        self.loaded = False
        self.cancelled: set[str] = set()
        self.served: list[str] = []
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
        with self.lock:
            self.served.append(request.request_id)
        for i, w in enumerate(words):
            if request.request_id in self.cancelled:
                yield TokenChunk(request.request_id, "", finish_reason="cancelled")
                return
            time.sleep(self.token_delay_s)
            yield TokenChunk(request.request_id, (" " if i else "") + w, [i], prompt_tokens=5 if i == 0 else 0)
        yield TokenChunk(request.request_id, "", finish_reason="stop")

    def cancel(self, request_id: str) -> bool:
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
        )

    def health(self) -> BackendHealth:
        return BackendHealth(healthy=self.loaded)

    def unload(self) -> None:
        self.loaded = False
