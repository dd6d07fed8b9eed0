"""Device health with exponential back-off: a device that failed is skipped until its back-off expires; a
device whose context is broken (a backend reports "restart required") is retired until the process restarts."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Failure:
    count: int
    reason: str
    until: float


class HealthTracker:
    """Marks devices unhealthy after a failure for base * 2**(n-1) seconds (capped), resets on success."""

    def __init__(
        self, base_backoff_s: float = 5.0, max_backoff_s: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._failures: dict[str, _Failure] = {}
        self._lock = threading.Lock()

    def mark_failure(self, device_id: str, reason: str) -> float:
        """Record a failure; return the back-off in seconds."""
        with self._lock:
            prev = self._failures.get(device_id)
            if prev is not None and math.isinf(prev.until):
                return math.inf  # retired: stays so
            count = prev.count + 1 if prev else 1
            backoff = min(self.base_backoff_s * 2 ** (count - 1), self.max_backoff_s)
            self._failures[device_id] = _Failure(count, reason, self._clock() + backoff)
            return backoff

    def retire(self, device_id: str, reason: str) -> None:
        """Mark a device unusable until the process restarts (its context is broken: no back-off can help)."""
        with self._lock:
            prev = self._failures.get(device_id)
            self._failures[device_id] = _Failure(prev.count + 1 if prev else 1, reason, math.inf)

    def mark_success(self, device_id: str) -> None:
        with self._lock:
            self._failures.pop(device_id, None)

    def is_healthy(self, device_id: str) -> bool:
        with self._lock:
            f = self._failures.get(device_id)
            return f is None or self._clock() >= f.until

    def reason(self, device_id: str) -> str:
        """Why the device is unhealthy, with the time left, or '' when healthy."""
        with self._lock:
            f = self._failures.get(device_id)
            if f is None:
                return ""
            if math.isinf(f.until):
                return f"{f.reason} (retired until the process restarts)"
            left = f.until - self._clock()
            return f"{f.reason} (failure #{f.count}, retry in {left:.0f}s)" if left > 0 else ""
