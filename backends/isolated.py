"""Run a backend in its own process, so a crash in native code takes only that process down.

A segfault or abort inside a runtime (onnxruntime-genai, a QNN or CUDA driver) or the kernel's OOM killer
would otherwise end the whole server. Here the real backend lives in a spawned child; the parent keeps the
Backend contract and forwards requests, chunks and cancels over a pipe. When the child dies, every request
it held ends with an error chunk naming the cause, `health()` turns false, and the engine drops this
backend and loads a fresh one (a new process) after the device's back-off; other devices keep serving.

The cost is one pickled message per chunk (tens of microseconds) and a second copy of the Python runtime;
the model itself is loaded only in the child.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from backends.base import (
    Backend,
    BackendCapabilities,
    BackendError,
    BackendHealth,
    ContextOverflowError,
    GenerationRequest,
    TokenChunk,
)

log = logging.getLogger(__name__)

_END = object()
_HEALTH_EVERY_S = 0.5
LOAD_TIMEOUT_S = 3600.0  # an export on first use can take long; a dead child is noticed at once anyway


class IsolatedBackend:
    """The Backend contract over a child process that runs `build()` (a picklable callable)."""

    def __init__(self, build: Callable[[], Backend], name: str = "backend") -> None:
        self._build = build
        self._name = name
        self._proc: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._pending: dict[str, queue.Queue[Any]] = {}
        self._pending_lock = threading.Lock()
        self._caps: BackendCapabilities | None = None
        self._child_health = BackendHealth(healthy=True)
        self._died: str | None = None
        self._reader: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def load(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds runtime threads and locks
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, self._build), name=f"accelserve-{self._name}")
        self._proc.daemon = True
        self._proc.start()
        child.close()
        self._conn = parent
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not parent.poll(0.2):
            if not self._proc.is_alive():
                raise BackendError(f"the {self._name} process died while loading ({self.exit_cause()})")
            if time.monotonic() > deadline:
                self._kill()
                raise BackendError(f"the {self._name} process did not load within {LOAD_TIMEOUT_S:.0f} s")
        try:
            kind, payload = parent.recv()
        except (EOFError, OSError) as e:
            raise BackendError(f"the {self._name} process died while loading ({self.exit_cause()})") from e
        if kind == "load_failed":
            self._kill()
            raise _rebuild_error(payload)
        self._caps = payload
        self._reader = threading.Thread(target=self._read, name=f"accelserve-{self._name}-reader", daemon=True)
        self._reader.start()
        log.info("%s runs in process %d", self._name, self._proc.pid)

    def unload(self) -> None:
        if self._proc is None:
            return
        self._send(("unload", None))
        self._proc.join(timeout=30)
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)

    # ---- serving ------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        if self._died is not None:
            raise BackendError(f"the {self._name} process is gone ({self._died}); it is reloaded on a later request")
        inbox: queue.Queue[Any] = queue.Queue()
        with self._pending_lock:
            if request.request_id in self._pending:
                raise ValueError(f"request_id {request.request_id!r} is already generating")
            self._pending[request.request_id] = inbox
        self._send(("generate", request))
        return self._drain(request.request_id, inbox)

    def _drain(self, request_id: str, inbox: queue.Queue[Any]) -> Iterator[TokenChunk]:
        try:
            while (item := inbox.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self._pending_lock:
                self._pending.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        with self._pending_lock:
            known = request_id in self._pending
        if known:
            self._send(("cancel", request_id))
        return known

    def capabilities(self) -> BackendCapabilities:
        if self._caps is None:
            raise BackendError(f"the {self._name} backend is not loaded")
        return self._caps

    def health(self) -> BackendHealth:
        with self._pending_lock:
            active = len(self._pending)
        if self._died is not None:
            return BackendHealth(False, active, f"the {self._name} process died: {self._died}")
        return replace(self._child_health, active_requests=active)

    def exit_cause(self) -> str:
        code = self._proc.exitcode if self._proc is not None else None
        if code is None:
            return "still running" if self._proc is not None and self._proc.is_alive() else "unknown"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    # ---- the pipe -----------------------------------------------------------------------------------
    def _send(self, message: tuple[str, Any]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, EOFError, ValueError) as e:  # the child is gone; the reader reports why
            log.debug("could not reach the %s process: %s", self._name, e)

    def _read(self) -> None:
        while True:
            try:
                kind, rid, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            if kind == "health":
                self._child_health = payload
                continue
            with self._pending_lock:
                inbox = self._pending.get(rid)
            if inbox is None:
                continue  # a request the caller already stopped reading
            if kind == "chunk":
                inbox.put(payload)
            elif kind == "raised":
                inbox.put(_rebuild_error(payload))
            elif kind == "end":
                inbox.put(_END)
        self._proc.join(timeout=5)
        self._died = self.exit_cause()
        log.error("the %s process died (%s); failing the requests it held", self._name, self._died)
        with self._pending_lock:
            held = list(self._pending.items())
        for rid, inbox in held:
            inbox.put(TokenChunk(rid, "", finish_reason="error", error=f"the {self._name} process died ({self._died})"))
            inbox.put(_END)


def _rebuild_error(payload: tuple[str, str]) -> BaseException:
    """Errors cross the pipe as (kind, message): their class decides bad request vs device failure."""
    kind, message = payload
    if kind == "overflow":
        return ContextOverflowError(message)
    if kind == "value":
        return ValueError(message)
    return BackendError(message)


def _describe(e: BaseException) -> tuple[str, str]:
    if isinstance(e, ContextOverflowError):
        return "overflow", str(e)
    if isinstance(e, ValueError):
        return "value", str(e)
    return "error", f"{type(e).__name__}: {e}"


def _child_main(conn: Any, build: Callable[[], Backend]) -> None:
    """The child: build and load the backend, then serve messages until told to unload or the parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole group: the parent decides
    try:
        backend = build()
        backend.load()
        conn.send(("loaded", backend.capabilities()))
    except BaseException as e:
        conn.send(("load_failed", _describe(e)))
        return
    lock = threading.Lock()

    def send(message: tuple[str, str, Any]) -> None:
        with lock:
            conn.send(message)

    def run(request: GenerationRequest) -> None:
        rid = request.request_id
        try:
            for chunk in backend.generate(request):
                send(("chunk", rid, chunk))
        except BaseException as e:
            send(("raised", rid, _describe(e)))
        finally:
            send(("end", rid, None))
            send(("health", "", backend.health()))

    def report_health() -> None:
        while True:
            time.sleep(_HEALTH_EVERY_S)
            send(("health", "", backend.health()))

    threading.Thread(target=report_health, daemon=True).start()
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if kind == "generate":
            threading.Thread(target=run, args=(payload,), daemon=True).start()
        elif kind == "cancel":
            backend.cancel(payload)
        elif kind == "unload":
            break
    backend.unload()
