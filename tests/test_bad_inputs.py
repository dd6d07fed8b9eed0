"""Bad input over HTTP, table-driven: each case gets its status in the API's error shape, the device stays
healthy, and the next good request on the SAME keep-alive connection is served (no reset, no server error)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from test_server import make_engine, running

from plugin.models.resolve import resolve_model
from plugin.serve.limits import ServerLimits
from plugin.serve.server import create_app

KEY = "k-123"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 4}
LIMITS = ServerLimits(max_body_bytes=2**20)  # the tiny model's context is 256 tokens: prompts > 8192 chars


def chat(**fields: object) -> dict:
    return {**GOOD, **fields}


def user(content: object) -> dict:
    return chat(messages=[{"role": "user", "content": content}])


def raw(text: str) -> bytes:
    return text.encode()


# (case id, path, body: dict -> JSON, bytes -> sent as is, expected status, error code or None, words in message)
CASES: list[tuple[str, str, object, int, str | None, str]] = [
    # malformed bodies
    ("not-json", "/v1/chat/completions", raw("{"), 400, "invalid_json", "not valid json"),
    ("truncated-json", "/v1/chat/completions", raw('{"model": "tiny", "messages": [{"ro'), 400, "invalid_json", "json"),
    ("array-body", "/v1/chat/completions", [], 400, None, "json object"),
    ("string-body", "/v1/chat/completions", "hello", 400, None, "json object"),
    ("null-body", "/v1/chat/completions", None, 400, None, ""),
    ("empty-body", "/v1/chat/completions", raw(""), 400, None, ""),
    ("deeply-nested", "/v1/chat/completions", raw('{"model": "tiny", "messages": ' + "[" * 20000), 400, None, ""),
    # wrong types and missing fields
    ("model-not-string", "/v1/chat/completions", chat(model=123), 400, None, "model"),
    ("messages-missing", "/v1/chat/completions", {"model": "tiny"}, 400, None, "messages"),
    ("messages-string", "/v1/chat/completions", chat(messages="hi"), 400, None, "messages"),
    ("messages-empty", "/v1/chat/completions", chat(messages=[]), 400, None, "messages is empty"),
    ("role-unknown", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400, None, "role"),
    ("content-missing", "/v1/chat/completions", chat(messages=[{"role": "user"}]), 400, None, "needs 'content'"),
    ("content-null", "/v1/chat/completions", user(None), 400, None, "needs 'content'"),
    ("content-number", "/v1/chat/completions", user(5), 400, None, "content"),
    ("content-image", "/v1/chat/completions", user([{"type": "image_url", "image_url": {}}]), 400, None, "text parts"),
    ("max-tokens-string", "/v1/chat/completions", chat(max_tokens="ten"), 400, None, "max_tokens"),
    ("max-tokens-zero", "/v1/chat/completions", chat(max_tokens=0), 400, None, "max_tokens"),
    ("max-tokens-negative", "/v1/chat/completions", chat(max_tokens=-5), 400, None, "max_tokens"),
    ("max-tokens-fraction", "/v1/chat/completions", chat(max_tokens=1.5), 400, None, "max_tokens"),
    ("max-tokens-huge", "/v1/chat/completions", chat(max_tokens=10**12), 400, "max_tokens_too_large", "at most 256"),
    ("max-completion-zero", "/v1/chat/completions", chat(max_completion_tokens=0), 400, None, "max_completion"),
    # out-of-range and non-finite numbers
    ("temperature-negative", "/v1/chat/completions", chat(temperature=-1), 400, None, "temperature"),
    ("temperature-above-2", "/v1/chat/completions", chat(temperature=3), 400, None, "temperature"),
    ("temperature-nan", "/v1/chat/completions", raw(json.dumps(chat(temperature=float("nan")))), 400, None, "temp"),
    ("temperature-inf", "/v1/chat/completions", raw(json.dumps(chat(temperature=float("inf")))), 400, None, "temp"),
    ("temperature-string", "/v1/chat/completions", chat(temperature="hot"), 400, None, "temperature"),
    ("top-p-zero", "/v1/chat/completions", chat(top_p=0), 400, None, "top_p"),
    ("top-p-above-1", "/v1/chat/completions", chat(top_p=1.5), 400, None, "top_p"),
    ("top-k-negative", "/v1/chat/completions", chat(top_k=-1), 400, None, "top_k"),
    ("repetition-penalty-zero", "/v1/chat/completions", chat(repetition_penalty=0), 400, None, "repetition"),
    ("seed-negative", "/v1/chat/completions", chat(seed=-1), 400, None, "seed"),
    ("seed-64-bit", "/v1/chat/completions", chat(seed=2**64), 400, None, "seed"),
    ("min-tokens-above-max", "/v1/chat/completions", chat(min_tokens=9, max_tokens=4), 400, None, "min_tokens"),
    ("stop-token-ids-negative", "/v1/chat/completions", chat(stop_token_ids=[-1]), 400, None, "stop_token_ids"),
    ("stop-number", "/v1/chat/completions", chat(stop=5), 400, None, "stop"),
    ("stop-empty-string", "/v1/chat/completions", chat(stop=[""]), 400, None, "stop"),
    ("top-logprobs-21", "/v1/chat/completions", chat(logprobs=True, top_logprobs=21), 400, None, "top_logprobs"),
    ("top-logprobs-alone", "/v1/chat/completions", chat(top_logprobs=2), 400, None, "needs logprobs"),
    # unsupported OpenAI fields and options
    ("n-2", "/v1/chat/completions", chat(n=2), 400, None, "n=2"),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, None, "tools"),
    ("json-mode", "/v1/chat/completions", chat(response_format={"type": "json_object"}), 400, None, "response"),
    ("unknown-field", "/v1/chat/completions", chat(temprature=0.5), 400, None, "temprature"),
    ("stream-options-no-stream", "/v1/chat/completions", chat(stream_options={}), 400, None, "stream_options"),
    ("stream-not-bool", "/v1/chat/completions", chat(stream="maybe"), 400, None, "stream"),
    ("policy-unknown", "/v1/chat/completions", chat(accelserve_policy="fastest"), 400, None, "accelserve_policy"),
    # bad unicode
    (
        "lone-surrogate",
        "/v1/chat/completions",
        raw('{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}'),
        400,
        None,
        "not valid unicode",
    ),
    (
        "surrogate-in-stop",
        "/v1/chat/completions",
        raw('{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "stop": ["\\udfff"]}'),
        400,
        None,
        "not valid unicode",
    ),
    (
        "invalid-utf8-bytes",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        None,
        "",
    ),
    # huge and empty fields
    ("prompt-too-large", "/v1/chat/completions", user("x" * 300_000), 413, "prompt_too_large", "characters"),
    ("body-too-large", "/v1/chat/completions", user("x" * 2_000_000), 413, "body_too_large", "bytes"),
    # completions
    ("prompt-empty-list", "/v1/completions", {"model": "tiny", "prompt": []}, 400, None, "prompt"),
    ("prompt-two", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, None, "one string"),
    ("prompt-number", "/v1/completions", {"model": "tiny", "prompt": 5}, 400, None, "prompt"),
    ("logprobs-true-completions", "/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": True}, 400, None, ""),
    ("prompt-surrogate", "/v1/completions", raw('{"model": "tiny", "prompt": "\\udc00"}'), 400, None, "unicode"),
    # unknown model and routes
    ("unknown-model", "/v1/chat/completions", chat(model="gpt-9"), 404, "model_not_found", "does not exist"),
    ("unknown-route", "/v1/embeddings", chat(), 404, "not_found", ""),
]

OLLAMA_CASES: list[tuple[str, str, object, int, str]] = [
    ("ollama-not-json", "/api/chat", raw("{"), 400, "not valid json"),
    ("ollama-array", "/api/chat", [], 400, "json object"),
    ("ollama-no-model", "/api/chat", {"messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
    ("ollama-messages-string", "/api/chat", {"model": "tiny", "messages": "x"}, 400, "messages"),
    ("ollama-content-null", "/api/chat", {"model": "tiny", "messages": [{"role": "user"}]}, 400, "content"),
    ("ollama-options-list", "/api/generate", {"model": "tiny", "prompt": "x", "options": []}, 400, "options"),
    (
        "ollama-num-predict-fill",
        "/api/generate",
        {"model": "tiny", "prompt": "x", "options": {"num_predict": -2}},
        400,
        "num_predict",
    ),
    (
        "ollama-temperature-nan",
        "/api/generate",
        raw('{"model": "tiny", "prompt": "x", "options": {"temperature": NaN}}'),
        400,
        "temperature",
    ),
    ("ollama-prompt-number", "/api/generate", {"model": "tiny", "prompt": 3}, 400, "prompt"),
    ("ollama-prompt-surrogate", "/api/generate", raw('{"model": "tiny", "prompt": "\\ud800"}'), 400, "unicode"),
    ("ollama-prompt-too-large", "/api/generate", {"model": "tiny", "prompt": "x" * 300_000}, 413, "characters"),
]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory) -> Iterator[tuple[str, object]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELSERVE_HOME", str(tmp_path_factory.mktemp("home")))
        engine = make_engine(resolve_model(tiny_llama), {})
        try:
            with running(create_app({"tiny": engine}, limits=LIMITS)) as url:
                yield url, engine
        finally:
            engine.close()


def send(client: httpx.Client, path: str, body: object) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def assert_good_request_still_served(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("echo")


@pytest.mark.parametrize(("path", "body", "status", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_openai_request(server, caplog, path, body, status, code, words):
    url, engine = server
    with caplog.at_level(logging.WARNING), httpx.Client(base_url=url, timeout=30) as client:
        r = send(client, path, body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["message"] and words.lower() in err["message"].lower(), err["message"]
        if code is not None:
            assert err["code"] == code
        assert "Traceback" not in r.text and "/tmp/" not in r.text and "site-packages" not in r.text
        assert_good_request_still_served(client)  # same connection: nothing was reset
    assert all(d["healthy"] for d in engine.status()), engine.status()
    assert "Exception in ASGI application" not in caplog.text and "unhandled error" not in caplog.text


@pytest.mark.parametrize(
    ("path", "body", "status", "words"), [c[1:] for c in OLLAMA_CASES], ids=[c[0] for c in OLLAMA_CASES]
)
def test_bad_ollama_request(server, caplog, path, body, status, words):
    url, engine = server
    with caplog.at_level(logging.WARNING), httpx.Client(base_url=url, timeout=30) as client:
        r = send(client, path, body)
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and words.lower() in r.json()["error"].lower(), r.text
        assert_good_request_still_served(client)
    assert all(d["healthy"] for d in engine.status())
    assert "Exception in ASGI application" not in caplog.text and "unhandled error" not in caplog.text


def test_auth_failures_are_401_and_the_connection_survives(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_HOME", str(tmp_path))
    engine = make_engine(resolve_model(tiny_llama), {})
    with engine, running(create_app({"tiny": engine}, api_key=KEY)) as url, httpx.Client(base_url=url) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic abc"}, {"authorization": ""}):
            r = client.post("/v1/chat/completions", json=GOOD, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
            r = client.post("/api/chat", json={"model": "tiny", "messages": []}, headers=headers)
            assert r.status_code == 401 and "key" in r.json()["error"].lower()
        ok = client.post("/v1/chat/completions", json=GOOD, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_refusals_are_counted_by_limit(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        send(client, "/v1/chat/completions", user("x" * 300_000))
        send(client, "/v1/chat/completions", user("x" * 2_000_000))
        text = client.get("/metrics").text
    for reason in ("prompt_too_large", "body_too_large"):
        line = next(
            ln for ln in text.splitlines() if ln.startswith(f'accelserve_rejected_requests_total{{reason="{reason}"')
        )
        assert float(line.split()[-1]) >= 1


def test_errors_never_carry_a_trace_or_a_server_path():
    from plugin.engine.engine import EngineError
    from plugin.serve.server import api_error_from

    unexpected = api_error_from(TypeError("bad operand at /home/alice/models/secret/model.onnx")).body()["error"]
    assert unexpected["type"] == "server_error" and unexpected["code"] == "internal_error"
    assert "TypeError" in unexpected["message"] and "/home" not in unexpected["message"]
    known = api_error_from(EngineError("load failed: /srv/cache/exports/abc123/model.onnx is truncated")).body()
    assert known["error"]["message"] == "load failed: <...>/model.onnx is truncated"
    routes = api_error_from(ValueError("see GET /v1/models and /api/tags")).body()["error"]["message"]
    assert routes == "see GET /v1/models and /api/tags"  # the API's own routes are not paths of the machine
