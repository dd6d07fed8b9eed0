"""Ollama's API beside the OpenAI one, for the chat front-ends and editor plugins that speak only Ollama.

`/api/chat`, `/api/generate` (NDJSON streaming by default, one JSON object with `"stream": false`),
`/api/tags`, `/api/show`, `/api/version`. Replies carry the same `x-accelserve-*` placement headers as the
OpenAI endpoints. Errors use Ollama's shape, `{"error": "..."}`. Sampling follows Ollama's meaning:
`options.temperature` (default 0.8), `top_p` (0.9), `top_k` (40), `repeat_penalty` (1.1), `seed`, `stop`,
`num_predict` (default and -1: 512 new tokens here; -2 is refused); other options are accepted and ignored,
as Ollama does.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import plugin
from backends.base import GenerationRequest, SamplingParams
from plugin.engine.engine import ChatChunk, Engine, Overloaded
from plugin.engine.explain import placement_headers
from plugin.serve.limits import ClientGone, Gate, LimitExceeded, client_of
from plugin.serve.redact import redact_paths
from plugin.serve.schema import BadRequest, check_text

OLLAMA_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1}
DEFAULT_NUM_PREDICT = 512
_OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repeat_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_new_tokens",
}


class OllamaError(Exception):
    """An error in Ollama's shape: {"error": message}."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse({"error": redact_paths(self.message)}, status_code=self.status, headers=headers)


def sampling_from_options(options: Any, context_length: int | None = None) -> SamplingParams:
    """Ollama `options` -> SamplingParams, with Ollama's defaults for what is not given. Without `num_predict`
    (or with -1, "until the context is full" in Ollama) the reply is bounded by 512 tokens and the context."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise OllamaError(400, f"options must be an object (got {type(options).__name__})")
    merged = {**OLLAMA_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    kwargs: dict[str, Any] = {}
    for name, target in _OPTION_NAMES.items():
        if name in merged:
            kwargs[target] = merged[name]
    predict = kwargs.get("max_new_tokens")
    if predict is None or predict == -1:
        kwargs["max_new_tokens"] = min(DEFAULT_NUM_PREDICT, context_length or DEFAULT_NUM_PREDICT)
    elif predict == -2:
        raise OllamaError(400, "num_predict=-2 (fill the context) is not supported; give a number of tokens")
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = (kwargs["stop"],)
    elif isinstance(kwargs.get("stop"), list):
        kwargs["stop"] = tuple(kwargs["stop"])
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        raise OllamaError(400, str(e)) from e


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise OllamaError(400, "messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OllamaError(400, f"messages[{i}] must be an object with a 'role' and a 'content'")
        content = m.get("content")
        if not isinstance(content, str):
            raise OllamaError(400, f"messages[{i}].content must be a string")
        if m.get("images"):
            raise OllamaError(400, f"messages[{i}] has images; this server serves text-only models")
        out.append({"role": m["role"], "content": _text(content, f"messages[{i}].content")})
    return out


def _text(value: str, param: str) -> str:
    try:
        return check_text(value, param)
    except BadRequest as e:
        raise OllamaError(400, str(e)) from None


def _details(engine: Engine) -> dict[str, Any]:
    p = engine.model.profile
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": p.architecture,
        "families": [p.architecture],
        "parameter_size": p.size_label,
        "quantization_level": "per placement (int4 on the NPU/CPU path, bf16/fp16 on the GPU)",
    }


def add_ollama_routes(
    app: FastAPI, engines: dict[str, Engine], guard: Callable[[Request], Any], gate: Gate | None = None
) -> None:
    """Mount Ollama's endpoints on `app`. `guard(request)` enforces the same API key as the OpenAI routes and
    `gate` the same server limits."""
    gate = gate or Gate()

    async def authorized(request: Request) -> None:
        try:
            await guard(request)
        except Exception as e:  # the OpenAI routes' 401, in Ollama's error shape
            status, message = getattr(e, "status", None), getattr(e, "message", None)
            if status is None or message is None:
                raise
            raise OllamaError(status, message) from e

    def engine_for(name: Any) -> Engine:
        if not isinstance(name, str) or name not in engines:
            raise OllamaError(404, f"model '{name}' not found; this server serves {sorted(engines)} (GET /api/tags)")
        return engines[name]

    async def body_of(request: Request) -> dict[str, Any]:
        await authorized(request)
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OllamaError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise OllamaError(400, "the request body must be a JSON object")
        return body

    @app.exception_handler(OllamaError)
    async def _ollama_error(_: Request, e: OllamaError) -> JSONResponse:
        return e.response()

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": plugin.__version__}

    @app.get("/api/tags")
    async def tags(request: Request) -> dict[str, Any]:
        await authorized(request)
        return {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "modified_at": _now(),
                    "size": e.model.profile.weight_bytes("int4"),
                    "digest": "",
                    "details": _details(e),
                }
                for name, e in engines.items()
            ]
        }

    @app.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        engine = engine_for(body.get("model") or body.get("name"))
        p = engine.model.profile
        template = engine.prompt_encoder().tokenizer.chat_template or ""
        return {
            "modelfile": "",
            "parameters": "\n".join(f"{k} {v}" for k, v in OLLAMA_DEFAULTS.items()),
            "template": template if isinstance(template, str) else json.dumps(template),
            "details": _details(engine),
            "model_info": {
                "general.architecture": p.architecture,
                "general.parameter_count": p.num_parameters,
                f"{p.architecture}.context_length": p.context_length,
                f"{p.architecture}.block_count": p.num_layers,
                f"{p.architecture}.embedding_length": p.hidden_size,
            },
            "capabilities": ["completion"],
        }

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body = await body_of(request)
        engine = engine_for(body.get("model"))
        if body.get("tools"):
            raise OllamaError(400, "tools are not supported by this server")
        messages = _messages(body.get("messages"))
        sampling = sampling_from_options(body.get("options"), engine.model.profile.context_length)
        req = GenerationRequest(messages=messages, sampling=sampling)
        return await _run(engine, body, req, "chat", gate, request)

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        body = await body_of(request)
        engine = engine_for(body.get("model"))
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")
        _text(prompt, "prompt")
        sampling = sampling_from_options(body.get("options"), engine.model.profile.context_length)
        if prompt == "":  # Ollama: an empty prompt only loads the model
            engine.preload()
            return JSONResponse({"model": body["model"], "created_at": _now(), "response": "", "done": True})
        if body.get("raw"):
            req = GenerationRequest(prompt=prompt, sampling=sampling)
        else:  # Ollama applies the model's template (with `system`) unless raw
            messages = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            req = GenerationRequest(messages=[*messages, {"role": "user", "content": prompt}], sampling=sampling)
        return await _run(engine, body, req, "generate", gate, request)


async def _run(
    engine: Engine, body: dict[str, Any], request: GenerationRequest, kind: str, gate: Gate, http: Request
) -> Response:
    """Stream NDJSON (Ollama's default) or answer one object; the first chunk is awaited first for real statuses."""
    started = time.perf_counter_ns()
    try:
        ticket = gate.admit(client_of(http), request, engine.model.profile.context_length)
    except LimitExceeded as e:
        raise OllamaError(e.status, e.message, e.retry_after_s) from e
    stream = engine.astream(request)
    try:
        first = await ticket.wait(anext(stream, None), http.is_disconnected)
    except BaseException as e:
        await stream.aclose()
        ticket.release()
        if isinstance(e, ClientGone):
            return Response(status_code=499)  # nobody reads it
        if isinstance(e, LimitExceeded):
            raise OllamaError(e.status, e.message, e.retry_after_s) from e
        if isinstance(e, ValueError):
            raise OllamaError(400, str(e)) from e
        if isinstance(e, Overloaded):
            raise OllamaError(429, str(e), retry_after_s=1) from e
        if isinstance(e, Exception):
            raise OllamaError(503, str(e)) from e
        raise
    if first is None:
        ticket.release()
        raise OllamaError(500, "the engine ended the stream without any chunk")
    headers = placement_headers(first.placement, request.request_id)
    model = body["model"]

    def piece(chunk: ChatChunk) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": _now()}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": chunk.text}
        else:
            out["response"] = chunk.text
        out["done"] = False
        return out

    def final(last: ChatChunk, text: str | None = None) -> dict[str, Any]:
        out = piece(last)
        if text is not None:
            out["message" if kind == "chat" else "response"] = (
                {"role": "assistant", "content": text} if kind == "chat" else text
            )
        m = last.metrics
        if last.finish_reason == "error":
            return {"model": model, "created_at": _now(), "error": f"generation failed: {last.error}", "done": True}
        ttft_ns = int((m.ttft_s or 0) * 1e9) if m else 0
        out.update(
            done=True,
            done_reason="length" if last.finish_reason == "length" else "stop",
            total_duration=time.perf_counter_ns() - started,
            load_duration=int((m.load_s if m else 0) * 1e9),
            prompt_eval_count=m.prompt_tokens if m else 0,
            prompt_eval_duration=ttft_ns,
            eval_count=m.new_tokens if m else 0,
            eval_duration=max(int((m.total_s if m else 0) * 1e9) - ttft_ns, 0),
        )
        return out

    if body.get("stream", True):

        async def lines() -> AsyncIterator[str]:
            chunk: ChatChunk | None = first
            try:
                while chunk is not None:
                    if chunk.finish_reason is not None:
                        yield json.dumps(final(chunk), ensure_ascii=False) + "\n"
                        return
                    if chunk.text:
                        yield json.dumps(piece(chunk), ensure_ascii=False) + "\n"
                    chunk = await ticket.wait(anext(stream, None))
            except LimitExceeded as e:  # past the deadline, or the server is draining: say so in the stream
                yield json.dumps({"model": model, "created_at": _now(), "error": e.message, "done": True}) + "\n"
            finally:
                ticket.release()
                await stream.aclose()  # a client that leaves cancels the generation

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    async def rest() -> tuple[list[str], ChatChunk]:
        parts, last = [first.text], first
        while last.finish_reason is None:
            last = await anext(stream)
            parts.append(last.text)
        return parts, last

    try:
        parts, last = await ticket.wait(rest(), http.is_disconnected)
    except ClientGone:
        return Response(status_code=499)
    except LimitExceeded as e:
        raise OllamaError(e.status, e.message, e.retry_after_s) from e
    finally:
        ticket.release()
        await stream.aclose()
    return JSONResponse(final(last, "".join(parts)), headers=headers)
