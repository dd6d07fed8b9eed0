"""The server's limits, enforced at the HTTP edge for both APIs (OpenAI's and Ollama's).

Why here and not in the engine: these protect the *server* (its memory, its event loop, fairness between
clients) before any model work starts, so a 100 MB body or a megabyte prompt is refused in microseconds
instead of being read and tokenized for minutes. The engine keeps its own admission (batch slots, KV
budget, the bounded line per backend) for what only it can know.

Every refusal is a `LimitExceeded` with the HTTP status a client expects (413 too large, 429 with
retry-after, 503 while shutting down, 504 past the request deadline) and is counted in `/metrics` by
reason.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backends.base import GenerationRequest

T = TypeVar("T")

# A token is rarely more than a few characters of text; 32 per token of the context window is a bound no
# prompt that fits can exceed, and it is checked on the raw text before any tokenizing.
CHARS_PER_TOKEN_BOUND = 32
_POLL_S = 0.25  # how often a waiting request checks for a client that left, its deadline and a drain


@dataclass(frozen=True)
class ServerLimits:
    """Settings with safe defaults; `accelserve serve --help` lists the flags that set them."""

    max_body_bytes: int = 4 * 2**20  # 413 above it, before the body is parsed
    max_prompt_chars: int | None = None  # 413 above it; None: 32 characters per token of the model's context
    max_tokens: int | None = None  # 400 above it; None: the model's context window
    max_queue: int = 32  # requests waiting per loaded backend; 429 beyond it (the engine's bounded line)
    max_streams_per_client: int = 32  # concurrent generations per client address; 429 beyond; 0: no limit
    request_timeout_s: float = 600.0  # 504 (or a final error event in a stream) past it
    drain_timeout_s: float = 30.0  # on SIGTERM: how long running generations may finish before they are ended
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are listed ("*" for any)

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_body_bytes", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be an integer >= 1 (got {getattr(self, name)!r})")
        for name in ("max_prompt_chars", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be an integer >= 1, or unset for the model's own bound (got {value!r})")
        if not isinstance(self.max_streams_per_client, int) or self.max_streams_per_client < 0:
            problems.append("max_streams_per_client must be an integer >= 0, 0 meaning no limit")
        for name in ("request_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be a number of seconds > 0 (got {value!r})")
        if problems:
            raise ValueError("Invalid server limits: " + "; ".join(problems))


class LimitExceeded(Exception):
    """A request refused by a server limit; `code` names the limit (and is the metrics label)."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.retry_after_s = (
            status,
            code,
            message,
            param,
            retry_after_s,
        )


class ClientGone(Exception):
    """The HTTP client disconnected before its reply was ready."""


@dataclass
class Drain:
    """Graceful shutdown: once begun, new generations get 503 and running ones have until `deadline`.

    `begin` may be called from a signal handler (any thread): it only writes two attributes.
    """

    deadline: float | None = None  # time.monotonic() at which running generations are ended

    def begin(self, timeout_s: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + timeout_s

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass
class Ticket:
    """One admitted generation: its deadline, and its place in its client's count (released exactly once)."""

    gate: Gate
    client: str
    deadline: float
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate.release(self.client)

    async def wait(self, work: Awaitable[T], is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> T:
        """Await `work` unless the request's deadline passes, the drain deadline passes or (when a callable is
        given) the client disconnects; the work is cancelled then, which cancels its engine request."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                # checked before every wait, so a stream whose chunks come faster than the poll still ends
                if time.monotonic() >= self.deadline:
                    raise self.gate.timed_out()
                if self.gate.drain.expired():
                    raise self.gate.shutting_down("the server is shutting down and ended this generation")
                remaining = self.deadline - time.monotonic()
                done, _ = await asyncio.wait({task}, timeout=max(0.0, min(_POLL_S, remaining)))
                if done:
                    return task.result()
                if is_disconnected is not None and await is_disconnected():
                    raise ClientGone()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


@dataclass
class Gate:
    """Admission at the HTTP edge: drain, per-client concurrency, prompt size and max_tokens, deadlines."""

    limits: ServerLimits = field(default_factory=ServerLimits)
    on_reject: Callable[[str], Any] | None = None  # called with the limit's code (metrics)
    drain: Drain = field(default_factory=Drain)
    streams: Counter[str] = field(default_factory=Counter)

    def reject(self, error: LimitExceeded) -> LimitExceeded:
        if self.on_reject is not None:
            self.on_reject(error.code)
        return error

    def admit(self, client: str, request: GenerationRequest, context_length: int) -> Ticket:
        """Check every edge limit for one generation request (raises LimitExceeded) and count it for `client`."""
        if self.drain.draining:
            raise self.shutting_down("the server is shutting down: it accepts no new generations")
        self.check_size(request, context_length)
        per_client = self.limits.max_streams_per_client
        if per_client and self.streams[client] >= per_client:
            raise self.reject(
                LimitExceeded(
                    429,
                    "too_many_streams",
                    f"this client already has {self.streams[client]} generations running, the limit per client is "
                    f"{per_client}; wait for one to finish (or raise --max-streams-per-client)",
                    retry_after_s=1,
                )
            )
        self.streams[client] += 1
        return Ticket(self, client, time.monotonic() + self.limits.request_timeout_s)

    def release(self, client: str) -> None:
        self.streams[client] -= 1
        if self.streams[client] <= 0:
            del self.streams[client]

    def check_size(self, request: GenerationRequest, context_length: int) -> None:
        """The raw text and max_tokens against their limits, before the prompt is tokenized."""
        max_chars = self.limits.max_prompt_chars or CHARS_PER_TOKEN_BOUND * context_length
        chars = prompt_chars(request)
        if chars > max_chars:
            raise self.reject(
                LimitExceeded(
                    413,
                    "prompt_too_large",
                    f"the prompt has {chars} characters, more than this server accepts ({max_chars}; the model's "
                    f"context is {context_length} tokens); shorten it",
                    param="messages" if request.messages is not None else "prompt",
                )
            )
        max_tokens = self.limits.max_tokens or context_length
        asked = request.sampling.max_new_tokens
        if asked > max_tokens:
            raise self.reject(
                LimitExceeded(
                    400,
                    "max_tokens_too_large",
                    f"max_tokens is too large: {asked}; this server allows at most {max_tokens} new tokens per request",
                    param="max_tokens",
                )
            )

    def timed_out(self) -> LimitExceeded:
        return self.reject(
            LimitExceeded(
                504,
                "request_timeout",
                f"the request did not finish within the server's limit of {self.limits.request_timeout_s:g} s; "
                "ask for fewer tokens or retry when the server is less busy",
            )
        )

    def shutting_down(self, message: str) -> LimitExceeded:
        return self.reject(LimitExceeded(503, "shutting_down", message, retry_after_s=5))


def client_of(http: Any) -> str:
    """Who a request comes from, for the per-client stream limit: its address (behind a proxy, the proxy's)."""
    return http.client.host if http.client else "unknown"


def prompt_chars(request: GenerationRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.get("content") or "") for m in request.messages or ())


class BodySizeLimit:
    """ASGI middleware: a body larger than `max_bytes` is answered 413 before the app parses any of it.

    A declared Content-Length is checked at once; a chunked body is read up to the limit and then replayed
    to the app, so it is never held beyond `max_bytes` either.
    """

    def __init__(self, app: Any, max_bytes: int, respond: Callable[[int], Any]) -> None:
        self.app, self.max_bytes, self.respond = app, max_bytes, respond

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:  # the HTTP server never delivers more bytes than the declared length
            size = int(declared) if declared.isdigit() else 0
            if size > self.max_bytes:
                return await self.respond(size)(scope, receive, send)
            return await self.app(scope, receive, send)
        parts, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            parts.append(message)
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                return await self.respond(total)(scope, receive, send)
            if not message.get("more_body", False):
                break
        return await self.app(scope, _replay(parts, receive), send)


def _replay(messages: list[Any], then: Any = None) -> Any:
    pending = list(messages)

    async def wrapped() -> Any:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return wrapped
