"""OpenAI-compatible HTTP API over one engine per model: chat and text completions (streamed or not),
model list, health and Prometheus metrics.

Every reply says where it ran: an `accelserve` field (device, backend, provider, precision, simulated,
reason, fallback_from, metrics) and `x-accelserve-*` headers. For a stream the server waits for the first
chunk before sending the headers, so they name the device that really serves it and a request refused
before any text (overloaded, no device, prompt too long) gets its true HTTP status instead of a 200 stream.

Security: loopback by default. A non-loopback bind needs an API key (`Authorization: Bearer <key>`) unless
the caller explicitly opts out, which is logged as a warning. Error messages never carry a stack trace or a
path of this machine; CORS is off unless origins are configured.

Limits (body size, prompt size, max_tokens, queue, streams per client, request timeout, drain on SIGTERM)
are `ServerLimits` settings, enforced by `plugin/serve/limits.py` for both APIs.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends.base import ContextOverflowError, GenerationRequest
from plugin.engine.engine import ChatChunk, Engine, EngineError, NoDeviceAvailable, Overloaded
from plugin.engine.explain import placement_headers
from plugin.serve.limits import BodySizeLimit, ClientGone, Gate, LimitExceeded, ServerLimits, Ticket, client_of
from plugin.serve.metrics import CLIENT_CLOSED, CONTENT_TYPE, ServerMetrics
from plugin.serve.ollama import add_ollama_routes
from plugin.serve.redact import redact_paths
from plugin.serve.schema import (
    BadRequest,
    ChatCompletionBody,
    CompletionBody,
    ResponseShape,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "ACCELSERVE_API_KEY"


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        message = redact_paths(self.message)
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_LIMIT_TYPES = {429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}


def api_error_from(e: BaseException) -> APIError:
    """Map an engine/backend exception to its HTTP status. Order matters: ContextOverflowError is a ValueError."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, LimitExceeded):
        headers = {"retry-after": str(e.retry_after_s)} if e.retry_after_s is not None else None
        type_ = _LIMIT_TYPES.get(e.status, "invalid_request_error")
        return APIError(e.status, e.message, type_, e.code, e.param, headers)
    if isinstance(e, ContextOverflowError):
        return APIError(413, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, BadRequest):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, Overloaded):
        return APIError(429, str(e), "rate_limit_error", "overloaded", headers={"retry-after": "1"})
    if isinstance(e, NoDeviceAvailable):
        return APIError(503, str(e), "service_unavailable_error", "no_device_available")
    if isinstance(e, EngineError):
        return APIError(500, str(e), "server_error", "engine_error")
    # The details (and the trace) are in the server's log, never in the response.
    return APIError(
        500,
        f"internal server error ({type(e).__name__}); the server log has the details",
        "server_error",
        "internal_error",
    )


# ---- app --------------------------------------------------------------------------------------------


def create_app(engines: dict[str, Engine], api_key: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """The HTTP app over ready engines (one per served model name). The caller owns (and closes) the engines."""
    if not engines:
        raise ValueError("create_app needs at least one engine: {model_name: Engine}")
    limits = limits or ServerLimits()
    metrics = ServerMetrics()
    gate = Gate(limits, on_reject=lambda code: metrics.rejected.labels(reason=code).inc())
    app = FastAPI(title="accelserve", description="OpenAI-compatible API over accelerator-aware engines")
    app.state.engines = engines
    app.state.metrics = metrics
    app.state.gate = gate

    def too_large(size: int) -> JSONResponse:
        metrics.rejected.labels(reason="body_too_large").inc()
        message = f"the request body has {size} bytes, more than this server accepts ({limits.max_body_bytes})"
        return APIError(413, message, code="body_too_large").response()

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, respond=too_large)
    if limits.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(limits.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
            expose_headers=["x-request-id", "x-accelserve-device", "x-accelserve-backend", "x-accelserve-provider"],
        )

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    # Known errors get their own handlers: Starlette answers a handler registered for bare `Exception` from
    # its outermost middleware and then re-raises, which logs a server error and can reset the client's
    # keep-alive connection. A bad request must be a plain 4xx.
    async def _known(_: Request, e: Exception) -> JSONResponse:
        return api_error_from(e).response()

    for known in (ValueError, EngineError, LimitExceeded):  # BadRequest and ContextOverflowError are ValueErrors
        app.add_exception_handler(known, _known)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return api_error_from(e).response()

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' (the key the server was started with).",
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401, "Incorrect API key provided.", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
            )

    guarded = [Depends(check_key)]

    def engine_for(name: str) -> Engine:
        if name not in engines:
            raise APIError(
                404,
                f"The model '{name}' does not exist on this server; it serves {sorted(engines)} (see GET /v1/models).",
                code="model_not_found",
                param="model",
            )
        return engines[name]

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        engine = engine_for(body.model)
        return await _generate(engine, body, body.to_request(), "chat", metrics, gate, request)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionBody, request: Request) -> Response:
        engine = engine_for(body.model)
        return await _generate(engine, body, body.to_request(), "completion", metrics, gate, request)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name, e) for name, e in engines.items()]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def model(name: str) -> dict[str, Any]:
        return _model_card(name, engine_for(name))

    add_ollama_routes(app, engines, check_key, gate)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness plus per-device state; 503 when some model has no healthy device left."""
        report = {}
        for name, engine in engines.items():
            devices = engine.status()
            report[name] = {"ok": any(d["healthy"] for d in devices), "devices": devices}
        ok = all(m["ok"] for m in report.values())
        return JSONResponse({"ok": ok, "models": report}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        text = metrics.render({name: engine.status() for name, engine in engines.items()})
        return Response(text, media_type=CONTENT_TYPE)

    return app


def _model_card(name: str, engine: Engine) -> dict[str, Any]:
    profile = engine.model.profile
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "accelserve",
        "accelserve": {
            "ref": redact_paths(str(engine.model.ref)),  # a hub id or "default" as is; a folder by its name
            "parameters": profile.num_parameters,
            "context_length": profile.context_length,
            "policy": engine.policy,
        },
    }


def _validation_error(e: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first bad field."""
    errors = e.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "model_attributes_type" or not loc:
        return APIError(400, f"The request body must be a JSON object: {first.get('msg')}")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"Invalid value for '{param}': {first.get('msg')}{more}", param=param)


# ---- generation -------------------------------------------------------------------------------------


async def _generate(
    engine: Engine,
    body: ChatCompletionBody | CompletionBody,
    request: GenerationRequest,
    kind: str,
    metrics: ServerMetrics,
    gate: Gate,
    http: Request,
) -> Response:
    """Run one request; the first chunk is awaited before any response is sent, so errors get real statuses.
    A client that leaves before its reply is complete cancels the generation (streamed or not); so do the
    request's deadline and the end of a drain."""
    model = body.model
    t0 = time.perf_counter()
    endpoint = "chat" if kind == "chat" else "completions"
    ticket = gate.admit(client_of(http), request, engine.model.profile.context_length)
    shape = ResponseShape(kind, model, request.request_id, token_text=_token_text(engine))  # type: ignore[arg-type]
    metrics.in_flight.labels(model=model).inc()
    done = _Finisher(metrics, model, endpoint, "none", t0, ticket)
    stream = engine.astream(request, policy=body.accelserve_policy)
    try:
        first = await ticket.wait(anext(stream, None), http.is_disconnected)
    except BaseException as e:
        await stream.aclose()
        if isinstance(e, Overloaded):
            metrics.rejected.labels(reason="queue_full").inc()
        done(CLIENT_CLOSED if isinstance(e, ClientGone) else api_error_from(e).status, None)
        if isinstance(e, ClientGone):
            return Response(status_code=int(CLIENT_CLOSED))  # nobody reads it
        if isinstance(e, Exception):
            raise api_error_from(e) from e
        raise
    if first is None:
        done(500, None)
        raise APIError(500, "the engine ended the stream without any chunk", "server_error", "engine_error")

    headers = placement_headers(first.placement, request.request_id)
    done.device = first.placement.device_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
        events = _sse(shape, first, stream, include_usage, done, continuous)
        return _SSEResponse(
            events,
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    logprobs: list = list(first.logprobs or [])

    async def rest() -> tuple[list[str], ChatChunk]:
        parts, last = [first.text], first
        while last.finish_reason is None:
            last = await anext(stream)
            parts.append(last.text)
            logprobs.extend(last.logprobs or [])
        return parts, last

    try:
        parts, last = await ticket.wait(rest(), http.is_disconnected)
    except ClientGone:
        done(CLIENT_CLOSED, None)
        return Response(status_code=int(CLIENT_CLOSED))
    except StopAsyncIteration:
        done(500, None)
        raise APIError(
            500, "the engine ended the stream without a final chunk", "server_error", "engine_error"
        ) from None
    except BaseException as e:
        err = api_error_from(e)
        done(err.status, None)
        if isinstance(e, Exception):
            raise err from e
        raise
    finally:
        await stream.aclose()
    if last.finish_reason == "error":
        done(500, last)
        err = APIError(
            500, f"generation failed on {last.placement.device_id}: {last.error}", "server_error", "generation_failed"
        )
        err.headers = headers
        raise err
    done(200, last)
    asked = request.sampling.logprobs is not None
    return JSONResponse(shape.full("".join(parts), last, logprobs if asked else None), headers=headers)


def _token_text(engine: Engine) -> Any:
    """id -> the token's text, special tokens included (as logprobs show them)."""

    def text(token_id: int) -> str:
        return engine.prompt_encoder().tokenizer.decode([token_id], skip_special_tokens=False)

    return text


class _Finisher:
    """Records a request's outcome exactly once (in-flight gauge, counters, histograms) and frees its ticket."""

    def __init__(
        self, metrics: ServerMetrics, model: str, endpoint: str, device: str, t0: float, ticket: Ticket
    ) -> None:
        self.metrics, self.model, self.endpoint, self.device, self.t0 = metrics, model, endpoint, device, t0
        self.ticket = ticket
        self.finished = False

    def __call__(self, status: int | str, last: ChatChunk | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.ticket.release()
        self.metrics.in_flight.labels(model=self.model).dec()
        m = last.metrics if last is not None else None
        self.metrics.observe_request(
            model=self.model,
            device=self.device,
            status=status,
            endpoint=self.endpoint,
            duration_s=time.perf_counter() - self.t0,
            ttft_s=m.ttft_s if m else None,
            new_tokens=m.new_tokens if m else 0,
            prompt_tokens=m.prompt_tokens if m else 0,
        )


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(
    shape: ResponseShape,
    first: ChatChunk,
    stream: AsyncIterator[ChatChunk],
    include_usage: bool,
    done: _Finisher,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's stream format. If the client goes away, closing this generator closes
    the engine stream, which cancels the backend and frees its slot."""
    chunk: ChatChunk | None = first
    is_first = True
    try:
        while chunk is not None:
            if chunk.finish_reason == "error":
                err = APIError(
                    500,
                    f"generation failed on {chunk.placement.device_id}: {chunk.error}",
                    "server_error",
                    "generation_failed",
                )
                yield _event(err.body())
                done(500, chunk)
                break
            yield _event(shape.chunk(chunk, is_first, continuous_usage))
            is_first = False
            if chunk.finish_reason is not None:
                if include_usage and chunk.metrics is not None:
                    yield _event(shape.usage_chunk(chunk.metrics))
                done(200, chunk)
                break
            chunk = await done.ticket.wait(anext(stream, None))
        else:
            done(500, None)
            yield _event(APIError(500, "the engine stream ended early", "server_error", "engine_error").body())
        yield "data: [DONE]\n\n"
    except Exception as e:  # a failure after the headers were sent can only be reported in the stream
        err = api_error_from(e)
        done(err.status, None)
        log.warning("stream failed after it started: %s", e)
        yield _event(err.body())
        yield "data: [DONE]\n\n"
    finally:
        done(CLIENT_CLOSED, None)  # no-op unless the client disconnected before the end
        await stream.aclose()  # type: ignore[attr-defined]


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator, even when the client disconnect cancels
    the send while the generator is parked at a `yield` (otherwise only garbage collection would close it)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


# ---- serve ------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(host: str, api_key: str | None, allow_insecure: bool) -> None:
    """Refuse to expose an unauthenticated API beyond this machine unless explicitly told to."""
    if is_loopback(host) or api_key:
        return
    if not allow_insecure:
        raise ValueError(
            f"refusing to serve on {host!r} without an API key: anyone who can reach this address could use it. "
            f"Pass --api-key KEY (or set {API_KEY_ENV}), bind 127.0.0.1, "
            "or pass --insecure-no-api-key to accept the risk"
        )
    log.warning(
        "!!! SERVING ON %s WITHOUT AN API KEY: anyone who can reach this address can run generations. "
        "Use --api-key on untrusted networks. !!!",
        host,
    )


def serve(
    models: Sequence[str] = ("default",),
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    allow_insecure: bool = False,
    policy: str = "auto",
    limits: ServerLimits | None = None,
    isolate_backends: bool = False,
    cpu_backend: str = "auto",
) -> None:
    """Load every model (exporting if needed), then serve them until interrupted (SIGTERM drains first).
    `isolate_backends` runs each backend in its own process, so a crash in a native runtime cannot take the
    server down (backends/isolated.py)."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key, allow_insecure)
    limits = limits or ServerLimits()
    names = list(models) or ["default"]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    engines: dict[str, Engine] = {}
    try:
        for name in names:
            log.info("loading %s ...", name)
            engine = Engine.from_pretrained(
                name,
                policy=policy,
                max_queue=limits.max_queue,
                isolate_backends=isolate_backends,
                cpu_backend=cpu_backend,
            )
            engines[name] = engine
            placement = engine.preload()
            log.info(
                "ready: %s on %s via %s (%s)%s",
                name,
                placement.device_id,
                placement.backend,
                placement.provider,
                " [simulated device]" if placement.simulated else "",
            )
        app = create_app(engines, api_key=api_key, limits=limits)
        log.info("serving %s on http://%s:%d/v1 (auth: %s)", names, host, port, "bearer key" if api_key else "none")
        run_app(app, host, port)
    finally:
        for engine in engines.values():
            engine.close()


def run_app(app: FastAPI, host: str, port: int, sockets: list[socket.socket] | None = None) -> None:
    """Serve `app` with uvicorn until SIGINT/SIGTERM. The first signal drains: the listener closes, new
    generations on open connections get 503, running ones have `drain_timeout_s` to finish and are then
    ended with a final error event, so no client is left hanging and the process exits cleanly."""
    import uvicorn

    gate: Gate = app.state.gate
    drain_s = gate.limits.drain_timeout_s

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's own handler re-raises the signal after shutting down, which would kill the process
            # before the caller closes its engines; this one drains, then returns normally (exit code 0).
            if not gate.drain.draining:
                log.info("shutting down: running generations have %.0f s to finish", drain_s)
            gate.drain.begin(drain_s)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
            self.should_exit = True

    # uvicorn's own grace period outlasts the drain, so the streams end themselves before it cancels anything
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_s + 5)
    DrainingServer(config).run(sockets=sockets)
