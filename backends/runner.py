"""What every continuous-batching runner shares: request bookkeeping around one scheduler thread.

The torch runner (backends/torch/batching.py) and the onnxruntime one (backends/ort_genai/batching.py)
differ in how they prefill and step; how a request is submitted, cancelled, finished or ended when the
runner stops is the same, and lives here once. Any thread may call the public methods; everything that
touches the running rows happens on the scheduler thread (`_run`, written by each runner).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Any, Protocol

from backends.base import FinishReason, TokenChunk


class RunnerWork(Protocol):
    """What the runner base needs of a request in flight (each runner's `Work` has more)."""

    request_id: str
    done: bool
    cancelled: bool
    out: queue.SimpleQueue
    stream: Any  # backends.stream.TokenStream


_LIVE: weakref.WeakSet[BatchRunnerBase] = weakref.WeakSet()


@atexit.register
def _stop_live_runners() -> None:
    """Join scheduler threads before the interpreter tears the runtimes down under them."""
    for runner in list(_LIVE):
        runner.stop("the process is exiting")


class BatchRunnerBase:
    """Submit / cancel / stop and the finishing of requests; subclasses write `_run`, `_remove_rows` and
    `_release`, and keep the running requests in `self.rows`."""

    thread_name = "batch-scheduler"
    runtime = "the backend"  # named in the error a request submitted during unload gets

    def __init__(self, *, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size  # what the engine admits at most; reported, not enforced here
        self._incoming: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._known: dict[str, Any] = {}
        self._cancel: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.rows: list[Any] = []
        self.last_error = ""  # the latest request-level failure (the runner carried on)
        self.steps = 0
        self.peak_batch = 0

    # ---- any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, work: RunnerWork) -> None:
        with self._lock:
            self._check_accepting()
            if self._stopping:
                raise RuntimeError(f"{self.runtime} is unloading; load it again before generating")
            if work.request_id in self._known:
                raise ValueError(f"request_id {work.request_id!r} is already generating; use a unique id")
            self._known[work.request_id] = work
        self._incoming.put(work)

    def cancel(self, request_id: str) -> bool:
        """Mark a request cancelled; the scheduler thread ends it before its next step. False if unknown."""
        with self._lock:
            work = self._known.get(request_id)
            if work is None:
                return False
            work.cancelled = True
            self._cancel.add(request_id)
        return True

    def active_count(self) -> int:
        with self._lock:
            return len(self._known)

    def stop(self, reason: str) -> None:
        """Stop the thread and end every open stream with an error chunk naming `reason`."""
        with self._lock:
            self._stopping = True
        self._incoming.put(None)
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self._end_all(reason)
        _LIVE.discard(self)

    # ---- hooks --------------------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        """Raise when no request may be submitted now (called under the lock); the base always accepts."""

    def _run(self) -> None:
        raise NotImplementedError

    def _remove_rows(self, indices: list[int]) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Drop the running batch's state (caches, samplers) once every request has ended."""

    # ---- scheduler thread ---------------------------------------------------------------------------
    def _crashed(self, message: str) -> None:
        """The loop itself failed: stop taking requests and end every stream with `message`."""
        self.last_error = message
        with self._lock:
            self._stopping = True
        self._end_all(message)

    def _end_all(self, reason: str) -> None:
        with self._lock:
            leftover = list(self._known.values())
        for w in leftover:
            self._end(w, "error", reason)
        self.rows = []
        self._release()

    def _take_cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._cancel:
                self._cancel.discard(request_id)
                return True
        return False

    def _drop_cancelled(self) -> None:
        if not self._cancel:
            return
        gone = [i for i, w in enumerate(self.rows) if self._take_cancel(w.request_id)]
        for i in gone:
            self._end(self.rows[i], "cancelled")
        self._remove_rows(gone)

    def _fail(self, w: RunnerWork, msg: str) -> None:
        self.last_error = msg
        self._end(w, "error", msg)

    def _end(self, w: RunnerWork, reason: FinishReason, error: str | None = None) -> None:
        """Finish a request for a reason other than its own tokens: cancelled, or an error."""
        if not w.done:
            self._finish(w, w.stream.end(reason, error))

    def _finish(self, w: RunnerWork, last: TokenChunk) -> None:
        if w.done:
            return
        w.done = True
        w.out.put(last)
        with self._lock:
            self._known.pop(w.request_id, None)
            self._cancel.discard(w.request_id)
