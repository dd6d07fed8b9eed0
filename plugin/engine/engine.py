"""The serving loop: place each request, load the backend it needs, stream its tokens, fall back on failure.

An asyncio loop on a background thread owns all scheduling state, and the engine is the one owner of
admission: each loaded backend gets a bounded waiting line, and a request is admitted when the backend
has a free batch slot (its max batch size) and the padded KV cache of its running requests plus this one
fits the backend's KV budget (backends/memory.py); a request that finds the line full fails at once
with `Overloaded`. Backends just run what they are given. They are blocking iterators, so each admitted
request runs on a thread of a shared pool and its chunks are piped back into the loop. A slot is freed
only when the backend thread has really stopped, so a cancelled request frees capacity the moment the
backend honours the cancel. Each request is tokenized once, in the caller's thread, with the model's own
tokenizer (backends/prompt.py); the backend receives the ids.

Memory: one ledger per device for the whole process (backends/memory.py, plugin/engine/budget.py). The
scheduler sees what each device's ledger has left now (live free memory minus headroom minus every
backend's reservation, plus what this engine's own backends hold there); before loading, idle backends
drawing on the same memory are unloaded, least recently used first, until the new backend's smallest
reservation (weights + activation allowance + one sequence's KV cache) fits both the device's budget and
its ledger; each backend then reserves in the ledger itself and admission uses the KV budget it was granted.

Failures: a backend that fails to load, or fails a request before streaming any text, marks its device
unhealthy (exponential back-off) and the request is placed again without that device; the reply's
placement names the device that served it and the failures that moved it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends import registry
from backends.base import (
    Backend,
    BackendCapabilities,
    ContextOverflowError,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
)
from backends.isolated import IsolatedBackend
from backends.memory import MemoryLedger, device_budget, fits, load_need
from backends.prompt import PromptEncoder
from plugin.engine.budget import LedgerLookup, live_ledger, same_memory
from plugin.engine.costmodel import CostModel
from plugin.engine.devices import DeviceInfo, discover_devices
from plugin.engine.health import HealthTracker
from plugin.engine.scheduler import DeviceLoad, Placement, PlacementError, PlacementRequest, place
from plugin.models.resolve import ResolvedModel, resolve_model

log = logging.getLogger(__name__)

BackendFactory = Callable[[ResolvedModel, Placement, DeviceInfo], Backend]
LOAD_MAX_BATCH = 8
"""The batch the room made before a load is sized for (the backends' default max_batch_size)."""


class EngineError(RuntimeError):
    """A request could not be served; the message says why and what to do."""


class Overloaded(EngineError):
    """The chosen backend's waiting line is full. Retry later or raise `max_queue`."""


class NoDeviceAvailable(EngineError):
    """No device could serve the request (none fits, pinned device absent, or all failed)."""


@dataclass
class RequestMetrics:
    queue_wait_s: float = 0.0
    ttft_s: float | None = None
    tokens_per_s: float | None = None  # decode rate after the first token
    new_tokens: int = 0
    prompt_tokens: int = 0
    total_s: float = 0.0
    load_s: float = 0.0  # time spent loading (and exporting) a backend for this request, if any

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ChatChunk:
    """A piece of a streamed reply; the last one has finish_reason and metrics set."""

    text: str
    placement: Placement
    request_id: str
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    prompt_tokens: int = 0  # running counts, for per-chunk usage (vLLM's continuous_usage_stats)
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # this chunk's tokens, when the request asked for logprobs


@dataclass
class ChatReply:
    text: str
    placement: Placement
    metrics: RequestMetrics
    finish_reason: str
    request_id: str = ""
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for


@dataclass
class _Slot:
    """A loaded backend and its worker state (all fields touched only on the engine loop)."""

    key: tuple[str, str, str]  # (device_id, backend, precision)
    backend: Backend
    device: DeviceInfo
    caps: BackendCapabilities  # what really runs it: provider, device kind and precision may differ from the plan
    weight_bytes: int
    active: int = 0
    waiting: int = 0
    waiting_tokens: int = 0
    last_used: float = field(default_factory=time.monotonic)
    running_kv: list[int] = field(default_factory=list)  # prompt + max_new_tokens of each running request
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def capacity(self) -> int:
        return max(1, self.caps.max_batch_size)

    def kv_fits(self, kv_tokens: list[int]) -> bool:
        """Whether these running requests' KV cache fits the backend's KV budget (always, when it sets none)."""
        if self.caps.kv_budget_bytes is None:
            return True
        return fits(0, kv_tokens, self.caps.kv_bytes_per_token, self.caps.kv_budget_bytes)

    def can_admit(self, kv_tokens: int) -> bool:
        return self.active < self.capacity and self.kv_fits([*self.running_kv, kv_tokens])


_DONE = object()


class Engine:
    """Serves one model across the machine's devices. Thread-safe; sync and async APIs."""

    def __init__(
        self,
        model: ResolvedModel,
        *,
        policy: str = "auto",
        devices: Sequence[DeviceInfo] | None = None,
        backend_factory: BackendFactory | None = None,
        cost_model: CostModel | None = None,
        health: HealthTracker | None = None,
        max_queue: int = 32,
        isolate_backends: bool = False,
        cpu_backend: str = "auto",
        ledgers: LedgerLookup | None = None,
    ) -> None:
        """`ledgers`: device -> its memory ledger (default: the process's live ledgers, plugin/engine/budget.py;
        `budget.no_ledger` for static budgets only)."""
        self.model = model
        self.policy = policy
        self.devices: list[DeviceInfo] = list(devices) if devices is not None else discover_devices()
        self.max_queue = max_queue
        # each backend in its own process: a crash in a native runtime fails only its requests (backends/isolated.py)
        self.isolate_backends = isolate_backends
        if cpu_backend != "auto" and cpu_backend not in registry.registered():
            names = ", ".join(sorted(registry.registered()))
            raise ValueError(f"unknown cpu_backend {cpu_backend!r}; choose 'auto' or one of {names}")
        self.cpu_backend = cpu_backend  # "auto", or the runtime the CPU must use (e.g. "torch")
        self.health = health or HealthTracker()
        self._ledgers: LedgerLookup = ledgers if ledgers is not None else live_ledger
        self.costs = cost_model if cost_model is not None else CostModel.load_default()
        if backend_factory is None:
            from plugin.engine.loaders import default_backend_factory

            backend_factory = default_backend_factory
        self._factory = backend_factory
        self._slots: dict[tuple[str, str, str], _Slot] = {}
        self._load_locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._encoder: PromptEncoder | None = None
        self._tokenizer_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="accelserve-gen")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="accelserve-engine", daemon=True)
        self._thread.start()
        self._closed = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_ref: str | Path = "default", *, policy: str = "auto", **kwargs: Any) -> Engine:
        """Resolve a model reference ("default", a folder, a .gguf file or a cached hub id) and serve it."""
        return cls(resolve_model(model_ref), policy=policy, **kwargs)

    def close(self) -> None:
        """Unload every backend and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._unload_all(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._save_costs()  # whatever the last requests measured

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API -----------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        stream: bool = False,
        policy: str | None = None,
        **sampling: Any,
    ) -> ChatReply | Iterator[ChatChunk]:
        """Chat completion. `stream=True` returns an iterator of ChatChunk; otherwise a ChatReply."""
        request = GenerationRequest(messages=messages, sampling=_sampling(sampling))
        return self._sync(request, policy, stream)

    def complete(
        self, prompt: str, *, stream: bool = False, policy: str | None = None, **sampling: Any
    ) -> ChatReply | Iterator[ChatChunk]:
        """Raw text completion (no chat template)."""
        request = GenerationRequest(prompt=prompt, sampling=_sampling(sampling))
        return self._sync(request, policy, stream)

    async def achat(
        self, messages: list[dict[str, str]], *, policy: str | None = None, **sampling: Any
    ) -> AsyncIterator[ChatChunk]:
        """Async streaming chat, usable from any event loop."""
        request = GenerationRequest(messages=messages, sampling=_sampling(sampling))
        async for chunk in self.astream(request, policy=policy):
            yield chunk

    async def astream(self, request: GenerationRequest, *, policy: str | None = None) -> AsyncIterator[ChatChunk]:
        """Stream any GenerationRequest from the caller's event loop."""
        caller = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        preq = await asyncio.to_thread(self._placement_request, request)

        async def pump() -> None:
            try:
                async for chunk in self._stream(request, preq, policy or self.policy):
                    caller.call_soon_threadsafe(q.put_nowait, chunk)
            except BaseException as e:
                caller.call_soon_threadsafe(q.put_nowait, e)
            finally:
                caller.call_soon_threadsafe(q.put_nowait, _DONE)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := await q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            fut.cancel()

    def cancel(self, request_id: str) -> bool:
        """Cancel a running request by id (any thread). True if a backend knew it."""
        return any([slot.backend.cancel(request_id) for slot in list(self._slots.values())])

    def status(self) -> list[dict[str, Any]]:
        """Per-device load and health, for dashboards and /health.

        A device is healthy when it is not in a failure back-off and every backend loaded on it says it is
        healthy (a torch backend whose batching thread crashed says it is not).
        """
        out = []
        all_slots = list(self._slots.values())  # one atomic copy: the loop thread may add slots meanwhile
        for d in self.devices:
            loaded = [(s, s.backend.health()) for s in all_slots if s.device.id == d.id]
            sick = [f"{s.key[1]}: {h.detail}" for s, h in loaded if not h.healthy]
            reason = self.health.reason(d.id) or "; ".join(sick)
            out.append(
                {
                    "device_id": d.id,
                    "kind": d.kind,
                    "name": d.name,
                    "simulated": d.simulated,
                    "emulated": d.emulated,
                    "healthy": self.health.is_healthy(d.id) and not sick,
                    "unhealthy_reason": reason,
                    "loaded": [
                        {
                            "backend": s.key[1],
                            "precision": s.key[2],
                            "provider": s.caps.provider,
                            "healthy": h.healthy,
                            "detail": h.detail,
                            "active": s.active,
                            "waiting": s.waiting,
                            "capacity": s.capacity,
                        }
                        for s, h in loaded
                    ],
                    "active": sum(s.active for s, _ in loaded),
                    "waiting": sum(s.waiting for s, _ in loaded),
                }
            )
        return out

    def predict(self, request: GenerationRequest, policy: str | None = None) -> Placement:
        """Where this request would go now, without running it."""
        return place(
            self.model.profile,
            self.devices,
            self._placement_request(request),
            policy or self.policy,
            load=self._load_snapshot(),
            costs=self.costs,
            cpu_backend=self.cpu_backend,
        )

    def preload(self, policy: str | None = None) -> Placement:
        """Load (exporting if needed) the backend a typical short chat would be placed on; return that placement."""
        request = GenerationRequest(messages=[{"role": "user", "content": "Hello"}])
        placement = self.predict(request, policy)
        slot = asyncio.run_coroutine_threadsafe(self._get_slot(placement), self._loop).result()
        return self._as_served(placement, slot, [], [])

    # ---- sync bridge ----------------------------------------------------------------------------
    def _sync(self, request: GenerationRequest, policy: str | None, stream: bool) -> ChatReply | Iterator[ChatChunk]:
        if self._closed:
            raise EngineError("engine is closed; create a new Engine")
        chunks = self._sync_stream(request, policy or self.policy)
        return chunks if stream else _collect(chunks)

    def _sync_stream(self, request: GenerationRequest, policy: str) -> Iterator[ChatChunk]:
        q: queue.Queue[Any] = queue.Queue()
        preq = self._placement_request(request)  # tokenizing happens here, never on the engine loop

        async def pump() -> None:
            try:
                async for chunk in self._stream(request, preq, policy):
                    q.put(chunk)
            except BaseException as e:
                q.put(e)
            finally:
                q.put(_DONE)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            fut.cancel()

    # ---- core (runs on the engine loop) -----------------------------------------------------------
    async def _stream(
        self, request: GenerationRequest, preq: PlacementRequest, policy: str
    ) -> AsyncIterator[ChatChunk]:
        failures: list[str] = []
        tried: list[str] = []
        while True:
            placement = self._place(preq, policy, tried, failures)
            t0 = time.perf_counter()
            try:
                slot = await self._get_slot(placement)
            except Exception as e:
                self._record_failure(placement, f"load failed: {e}", tried, failures)
                continue
            load_s = time.perf_counter() - t0
            placement = self._as_served(placement, slot, tried, failures)
            streamed_any = False
            async for item in self._run_on_slot(slot, request, placement, preq, load_s):
                if isinstance(item, _FailedBeforeOutput):
                    self._record_failure(placement, item.reason, tried, failures)
                    break
                streamed_any = True
                yield item
            else:
                if streamed_any:
                    self.health.mark_success(slot.device.id)
                return

    def _place(self, preq: PlacementRequest, policy: str, tried: list[str], failures: list[str]) -> Placement:
        try:
            return place(
                self.model.profile,
                self.devices,
                preq,
                policy,
                load=self._load_snapshot(),
                costs=self.costs,
                exclude=tried,
                cpu_backend=self.cpu_backend,
            )
        except PlacementError as e:
            if failures:
                raise NoDeviceAvailable(f"{e} Earlier attempts failed: {'; '.join(failures)}") from e
            raise NoDeviceAvailable(str(e)) from e

    def _record_failure(self, placement: Placement, reason: str, tried: list[str], failures: list[str]) -> None:
        backoff = self.health.mark_failure(placement.device_id, reason)
        tried.append(placement.device_id)
        failures.append(f"{placement.device_id} ({placement.backend}): {reason}")
        log.warning(
            "%s failed: %s; marked unhealthy for %.0fs, trying the next device", placement.device_id, reason, backoff
        )

    def _as_served(self, placement: Placement, slot: _Slot, tried: list[str], failures: list[str]) -> Placement:
        """The placement as it really runs: the provider that loaded, and what moved it here."""
        reason = placement.reason
        caps = slot.caps
        if caps.device != placement.device:
            reason += (
                f" The {placement.device.upper()} provider could not load, so it runs on the "
                f"{caps.device.upper()} ({caps.provider})."
            )
        if failures:
            reason += " Fell back after: " + "; ".join(failures) + "."
        return dataclasses.replace(
            placement,
            device=caps.device,
            provider=caps.provider,
            precision=caps.precision,
            simulated=caps.simulated,
            emulated=caps.emulated,
            reason=reason,
            fallback_from=tuple(tried),
        )

    async def _run_on_slot(
        self, slot: _Slot, request: GenerationRequest, placement: Placement, preq: PlacementRequest, load_s: float
    ) -> AsyncIterator[ChatChunk | _FailedBeforeOutput]:
        if slot.waiting >= self.max_queue:
            raise Overloaded(
                f"{placement.device_id} ({placement.backend}) has {slot.waiting} requests waiting, the limit is "
                f"{self.max_queue}; retry later or start the engine with a larger max_queue"
            )
        kv_tokens = preq.prompt_tokens + preq.max_new_tokens
        if not slot.kv_fits([kv_tokens]):
            raise ContextOverflowError(
                f"the request needs a KV cache for {kv_tokens} tokens ({preq.prompt_tokens} prompt + "
                f"{preq.max_new_tokens} new), more than {placement.device_id}'s KV budget of "
                f"{slot.caps.kv_budget_bytes} bytes holds even alone; lower max_new_tokens or shorten the prompt"
            )
        metrics = RequestMetrics(load_s=load_s)
        t_queued = time.perf_counter()
        slot.waiting += 1
        slot.waiting_tokens += kv_tokens
        try:
            async with slot.changed:
                await slot.changed.wait_for(lambda: slot.can_admit(kv_tokens))
                slot.active += 1
                slot.running_kv.append(kv_tokens)
        finally:
            slot.waiting -= 1
            slot.waiting_tokens -= kv_tokens
        slot.last_used = time.monotonic()
        t_start = time.perf_counter()
        metrics.queue_wait_s = t_start - t_queued
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce() -> None:
            try:
                for chunk in slot.backend.generate(request):
                    loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except BaseException as e:
                loop.call_soon_threadsafe(chunks.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(chunks.put_nowait, _DONE)

        worker = loop.run_in_executor(self._pool, produce)
        worker.add_done_callback(lambda _: self._release(slot, kv_tokens))  # on the loop, before any awaiter wakes
        finished = False
        t_first = t_last = None
        try:
            while (item := await chunks.get()) is not _DONE:
                error = _error_of(item)
                if error is not None:
                    finished = True
                    if isinstance(item, ValueError):  # a bad request: no other device would do better
                        raise item
                    # before any output, a raised error or a backend that is no longer healthy is the device's
                    # failure (try the next one); an error chunk from a backend that is still healthy is this
                    # request's own (out of memory for it, non-finite logits): the device stays healthy
                    if metrics.new_tokens == 0 and (isinstance(item, BaseException) or self._sick(slot)):
                        yield _FailedBeforeOutput(error)
                        return
                    metrics.total_s = time.perf_counter() - t_start
                    yield ChatChunk("", placement, request.request_id, "error", metrics, error=error)
                    return
                chunk: TokenChunk = item
                now = time.perf_counter()
                if chunk.prompt_tokens:
                    metrics.prompt_tokens = chunk.prompt_tokens
                if chunk.token_ids:
                    if t_first is None:
                        t_first = now
                        metrics.ttft_s = now - t_start
                    t_last = now
                    metrics.new_tokens += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    await worker  # the slot is free before the caller sees the end of its stream
                    finished = True
                    metrics.total_s = now - t_start
                    if t_first is not None and t_last is not None and metrics.new_tokens > 1 and t_last > t_first:
                        metrics.tokens_per_s = (metrics.new_tokens - 1) / (t_last - t_first)
                    self._observe(placement, metrics)
                    yield ChatChunk(
                        chunk.text,
                        placement,
                        request.request_id,
                        chunk.finish_reason,
                        metrics,
                        prompt_tokens=metrics.prompt_tokens,
                        completion_tokens=metrics.new_tokens,
                        logprobs=chunk.logprobs,
                    )
                    return
                if chunk.text or chunk.token_ids:
                    yield ChatChunk(
                        chunk.text,
                        placement,
                        request.request_id,
                        prompt_tokens=metrics.prompt_tokens,
                        completion_tokens=metrics.new_tokens,
                        logprobs=chunk.logprobs,
                    )
        finally:
            if not finished:
                slot.backend.cancel(request.request_id)

    def _sick(self, slot: _Slot) -> bool:
        """Whether the slot's backend says it is unhealthy; a device that needs a process restart is retired."""
        health = slot.backend.health()
        if getattr(health, "restart_required", False):
            self.health.retire(slot.device.id, health.detail)
        return not health.healthy

    def _release(self, slot: _Slot, kv_tokens: int) -> None:
        slot.active -= 1
        slot.running_kv.remove(kv_tokens)
        slot.last_used = time.monotonic()

        async def wake() -> None:
            async with slot.changed:
                slot.changed.notify_all()

        self._loop.create_task(wake())

    def _observe(self, placement: Placement, metrics: RequestMetrics) -> None:
        """Feed measured rates back into the cost model the scheduler predicts with (saved off the loop)."""
        device = next(d for d in self.devices if d.id == placement.device_id)
        if device.kind != placement.device:
            return  # a provider fell back to another kind of silicon: these rates are not this device's
        prefill_tps = metrics.prompt_tokens / metrics.ttft_s if metrics.ttft_s and metrics.prompt_tokens else None
        self.costs.observe(
            device,
            self.model.profile,
            prefill_tps=prefill_tps,
            decode_tps=metrics.tokens_per_s,
            precision=placement.precision,
        )
        self._loop.run_in_executor(self._pool, self._save_costs)

    def _save_costs(self) -> None:
        try:
            self.costs.save()
        except OSError as e:  # a read-only cache must not fail the request that was served
            log.warning("could not persist measured rates: %s", e)

    async def _get_slot(self, placement: Placement) -> _Slot:
        key = (placement.device_id, placement.backend, placement.precision)
        slot = self._slots.get(key)
        if slot is not None:
            health = slot.backend.health()
            if health.healthy:
                return slot
            if getattr(health, "restart_required", False):  # reloading on a broken context fails again: retire
                self.health.retire(slot.device.id, health.detail)
            # a backend that died under us (e.g. its batching thread crashed): drop it, and let the caller
            # mark the device failed and place the request elsewhere
            await self._unload(slot)
            raise EngineError(f"the loaded {placement.backend} backend is unhealthy: {health.detail}")
        lock = self._load_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._slots:
                return self._slots[key]
            device = next(d for d in self.devices if d.id == placement.device_id)
            weight_bytes = self.model.profile.weight_bytes(placement.precision)
            need = load_need(self.model.profile, placement.precision, max_batch=LOAD_MAX_BATCH)
            await self._make_room(device, need)
            loop = asyncio.get_running_loop()
            backend = await loop.run_in_executor(self._pool, self._load_backend, placement, device)
            caps = backend.capabilities()
            slot = _Slot(
                key=key,
                backend=backend,
                device=device,
                caps=caps,
                weight_bytes=weight_bytes,
            )
            self._slots[key] = slot
            log.info("loaded %s on %s via %s (%s)", self.model.ref, device.id, caps.name, caps.provider)
            return slot

    def _load_backend(self, placement: Placement, device: DeviceInfo) -> Backend:
        if self.isolate_backends:
            build = functools.partial(self._factory, self.model, placement, device)
            backend: Backend = IsolatedBackend(build, name=f"{placement.backend} on {device.id}")
        else:
            backend = self._factory(self.model, placement, device)
        backend.load()
        return backend

    async def _make_room(self, device: DeviceInfo, needed: int) -> None:
        """Unload idle backends drawing on this device's memory (the device itself, or the same ledger, e.g.
        host RAM), least recently used first, until `needed` bytes fit both the device's budget and what its
        ledger has left. If they still do not fit, the backend's own reservation refuses the load, and the
        request moves to another device."""
        budget = device_budget(
            device.kind, device.memory_bytes, simulated=device.simulated, host_memory_bytes=self._host_memory()
        )
        book = self._ledgers(device)

        def lacking() -> int:
            on_device = sum(self._held(s) for s in self._slots.values() if s.device.id == device.id)
            lack = on_device + needed - budget
            if book is not None:
                lack = max(lack, needed - book.available())
            return lack

        sharing = sorted(
            (s for s in self._slots.values() if same_memory(s.device, device, self._ledgers)),
            key=lambda s: s.last_used,
        )
        for slot in sharing:
            if lacking() <= 0:
                return
            if slot.active or slot.waiting:
                continue
            log.info("unloading idle %s from %s to make room on %s", slot.key, slot.device.id, device.id)
            await self._unload(slot)
        if lacking() > 0:
            short = lacking()
            log.info("%s: %d bytes short with idle backends unloaded; the load may be refused", device.id, short)

    @staticmethod
    def _held(slot: _Slot) -> int:
        """What a loaded backend holds: its ledger reservation, else (a backend in another process, one that
        does not reserve) its weights."""
        reservation = getattr(slot.backend, "reservation", None)
        return reservation.total if reservation is not None else slot.weight_bytes

    def _memory_available(self, device: DeviceInfo, ledgers: dict[int, int], slots: list[_Slot]) -> int | None:
        """What this engine could use on `device` now: its ledger's free room plus what this engine's backends
        hold on the same memory; None when its memory is not measured."""
        book: MemoryLedger | None = self._ledgers(device)
        if book is None:
            return None
        if id(book) not in ledgers:
            ledgers[id(book)] = book.available()
        own = sum(self._held(s) for s in slots if same_memory(s.device, device, self._ledgers))
        return ledgers[id(book)] + own

    def _host_memory(self) -> int | None:
        cpu = next((d for d in self.devices if d.kind == "cpu" and not d.simulated), None)
        return cpu.memory_bytes if cpu is not None else None

    async def _unload(self, slot: _Slot) -> None:
        self._slots.pop(slot.key, None)
        await asyncio.get_running_loop().run_in_executor(self._pool, slot.backend.unload)

    async def _unload_all(self) -> None:
        for slot in list(self._slots.values()):
            await self._unload(slot)

    def unload_idle(self, idle_s: float = 0.0) -> int:
        """Unload backends idle for at least `idle_s` seconds; returns how many were unloaded."""

        async def run() -> int:
            now = time.monotonic()
            idle = [s for s in self._slots.values() if not s.active and not s.waiting and now - s.last_used >= idle_s]
            for s in idle:
                await self._unload(s)
            return len(idle)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    # ---- helpers --------------------------------------------------------------------------------
    def _load_snapshot(self) -> dict[str, DeviceLoad]:
        snap = {}
        all_slots = list(self._slots.values())
        available: dict[int, int] = {}  # one reading per ledger
        for d in self.devices:
            slots = [s for s in all_slots if s.device.id == d.id]
            snap[d.id] = DeviceLoad(
                queued_requests=sum(s.waiting for s in slots),
                active_requests=sum(s.active for s in slots),
                queued_tokens=sum(s.waiting_tokens for s in slots),
                healthy=self.health.is_healthy(d.id),
                unhealthy_reason=self.health.reason(d.id),
                memory_available_bytes=self._memory_available(d, available, all_slots),
            )
        return snap

    def _placement_request(self, request: GenerationRequest) -> PlacementRequest:
        """Tokenize the request (once: the backend receives the ids) and size it for the scheduler."""
        if request.prompt_ids is None:
            request.prompt_ids = self.prompt_encoder().encode(request)
        return PlacementRequest(prompt_tokens=len(request.prompt_ids), max_new_tokens=request.sampling.max_new_tokens)

    def prompt_encoder(self) -> PromptEncoder:
        """The model's tokenizer and chat template (loaded on first use; every backend of the model shares it)."""
        with self._tokenizer_lock:
            if self._encoder is None:
                self._encoder = PromptEncoder.from_folder(self.model.path)
            return self._encoder


@dataclass
class _FailedBeforeOutput:
    reason: str


def _error_of(item: TokenChunk | BaseException) -> str | None:
    """The error text of a raised exception or an error chunk; None for a normal chunk."""
    if isinstance(item, BaseException):
        return f"{type(item).__name__}: {item}"
    if item.finish_reason == "error":
        return item.error or "backend error"
    return None


def _sampling(kwargs: dict[str, Any]) -> SamplingParams:
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"unknown generation option(s) {sorted(unknown)}; accepted: {sorted(known)}")
    if isinstance(kwargs.get("stop"), list):
        kwargs = {**kwargs, "stop": tuple(kwargs["stop"])}
    return SamplingParams(**kwargs)


def _collect(chunks: Iterator[ChatChunk]) -> ChatReply:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    last: ChatChunk | None = None
    for chunk in chunks:
        parts.append(chunk.text)
        logprobs.extend(chunk.logprobs or [])
        last = chunk
    if last is None or last.metrics is None:
        raise EngineError("the backend ended the stream without a final chunk")
    if last.finish_reason == "error":
        raise EngineError(f"generation failed on {last.placement.device_id}: {last.error}")
    return ChatReply(
        "".join(parts),
        last.placement,
        last.metrics,
        last.finish_reason or "stop",
        last.request_id,
        logprobs if logprobs else None,
    )
