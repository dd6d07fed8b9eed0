"""HTTP server: a real uvicorn on a loopback port, driven by the official openai client and raw httpx."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from backends.base import ContextOverflowError, GenerationRequest, TokenChunk
from plugin.engine.costmodel import CostModel
from plugin.engine.engine import Engine
from plugin.models.resolve import resolve_model
from plugin.serve.limits import ServerLimits
from plugin.serve.server import check_bind, create_app, is_loopback

from fakes import FakeBackend, device

KEY = "test-key-123"


class RecordingBackend(FakeBackend):
    """A FakeBackend that keeps every request it was asked to generate (to check sampling fields arrive)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[GenerationRequest] = []

    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        self.requests.append(request)
        yield from super().generate(request)


class OverflowBackend(FakeBackend):
    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        raise ContextOverflowError("prompt of 9000 tokens plus max_new_tokens 16 exceeds the context window of 256")


class MidStreamFailure(FakeBackend):
    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        yield TokenChunk(request.request_id, "partial", [1], prompt_tokens=5)
        yield TokenChunk(request.request_id, "", finish_reason="error", error="device lost mid-stream")


def make_engine(model, backends: dict[str, FakeBackend], kinds=("cpu", "gpu", "npu"), **kw) -> Engine:
    def factory(resolved, placement, dev):
        return backends.setdefault(dev.kind, RecordingBackend(dev.kind))

    kw.setdefault("cost_model", CostModel(path=None))
    return Engine(model, devices=[device(k) for k in kinds], backend_factory=factory, **kw)


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with a real uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class Stack:
    """Engines, their fake backends and the running server shared by the tests of this module."""

    def __init__(self, url: str, engines: dict[str, Engine], backends: dict[str, dict[str, FakeBackend]]) -> None:
        self.url = url
        self.engines = engines
        self.backends = backends

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def post(self, path: str, body: object, timeout: float = 10, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout, **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture(scope="module")
def stack(tiny_llama, tmp_path_factory) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELSERVE_HOME", str(tmp_path_factory.mktemp("home")))
        model = resolve_model(tiny_llama)
        backends: dict[str, dict[str, FakeBackend]] = {
            "tiny": {},
            "slow": {"npu": FakeBackend("npu", token_delay_s=0.05, capacity=1, words=400)},
            "overflow": {"npu": OverflowBackend("npu"), "cpu": OverflowBackend("cpu")},
            "flaky": {"npu": MidStreamFailure("npu")},
        }
        engines = {
            "tiny": make_engine(model, backends["tiny"]),
            "slow": make_engine(model, backends["slow"], kinds=("cpu", "npu"), policy="npu", max_queue=1),
            "overflow": make_engine(model, backends["overflow"], kinds=("cpu", "npu")),
            "flaky": make_engine(model, backends["flaky"], kinds=("cpu", "npu"), policy="npu"),
        }
        try:
            # the fake backends stream more words than the tiny model's context window holds
            with running(create_app(engines, limits=ServerLimits(max_tokens=4096))) as url:
                yield Stack(url, engines, backends)
        finally:
            for e in engines.values():
                e.close()


def assert_error(r: httpx.Response, status: int, type_: str, words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert words.lower() in err["message"].lower(), err["message"]
    return err


# ---- happy paths through the official client --------------------------------------------------------


def test_chat_completion_with_openai_client(stack):
    raw = stack.client().chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=16
    )
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    # three words and the EOS token, which every backend counts
    assert reply.usage.completion_tokens == 4 and reply.usage.total_tokens == 4 + reply.usage.prompt_tokens
    placement = reply.model_extra["accelserve"]
    assert placement["device"] == "npu" and placement["simulated"] is True
    assert placement["provider"] == "CPUExecutionProvider" and placement["backend"]
    assert placement["reason"] and placement["metrics"]["new_tokens"] == 4
    assert raw.headers["x-accelserve-device"] == "npu"
    assert raw.headers["x-accelserve-provider"] == "CPUExecutionProvider"


def test_sampling_fields_and_extensions_reach_the_backend(stack):
    reply = stack.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "sample me"}],
        max_completion_tokens=7,
        temperature=0.7,
        top_p=0.9,
        seed=42,
        stop=["END"],
        extra_body={"top_k": 5, "repetition_penalty": 1.2, "accelserve_policy": "gpu"},
    )
    assert reply.model_extra["accelserve"]["device"] == "gpu"
    request = stack.backends["tiny"]["gpu"].requests[-1]
    s = request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed, s.stop, s.top_k) == (7, 0.7, 0.9, 42, ("END",), 5)
    assert s.repetition_penalty == 1.2
    assert request.messages[0] == {"role": "system", "content": "be brief"}


def test_streaming_chat_with_openai_client(stack):
    stream = stack.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "stream these words please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 5  # one per word: really streamed, not one blob
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == "echo: stream these words please"
    assert text_chunks[0].choices[0].delta.role == "assistant"
    assert text_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.model_extra["accelserve"]["device"] == "npu" for c in text_chunks)
    assert text_chunks[-1].model_extra["accelserve"]["metrics"]["new_tokens"] == 6  # five words + EOS
    assert chunks[-1].usage.completion_tokens == 6  # the include_usage chunk


def test_stream_headers_name_the_serving_device(stack):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "accelserve_policy": "cpu",
    }
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accelserve-device"] == "cpu"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["accelserve"]["device"] == "cpu"


def test_completions_with_openai_client(stack):
    client = stack.client()
    reply = client.completions.create(model="tiny", prompt="one two three", max_tokens=8)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "echo: one two three"
    assert reply.usage.completion_tokens == 5  # four words + EOS
    assert reply.model_extra["accelserve"]["device"] == "npu"
    request = stack.backends["tiny"]["npu"].requests[-1]
    assert request.prompt == "one two three" and request.messages is None
    parts = list(client.completions.create(model="tiny", prompt="a b", stream=True))
    assert "".join(p.choices[0].text for p in parts) == "echo: a b"
    assert parts[-1].choices[0].finish_reason == "stop"


def test_models_list(stack):
    client = stack.client()
    ids = {m.id for m in client.models.list()}
    assert ids == {"tiny", "slow", "overflow", "flaky"}
    assert client.models.retrieve("tiny").owned_by == "accelserve"


# ---- errors, each with its status, in OpenAI's shape ------------------------------------------------


def test_invalid_sampling_value_is_400(stack):
    r = stack.post(
        "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}
    )
    assert_error(r, 400, "invalid_request_error", "top_p must be in (0, 1]")
    r = stack.post(
        "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}
    )
    assert_error(r, 400, "invalid_request_error", "'temperature': input should be greater than or equal to 0")


def test_schema_problems_are_400_not_422(stack):
    r = httpx.post(
        f"{stack.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_request_error", "not valid JSON")
    err = assert_error(stack.post("/v1/chat/completions", {"model": "tiny"}), 400, "invalid_request_error", "messages")
    assert err["param"] == "messages"
    r = stack.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2})
    assert assert_error(r, 400, "invalid_request_error", "n=2")["param"] == "n"
    r = stack.post(
        "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temprature": 0.5}
    )
    assert_error(r, 400, "invalid_request_error", "Unrecognized request argument supplied: 'temprature'")
    r = stack.post(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "accelserve_policy": "fastest"},
    )
    assert_error(r, 400, "invalid_request_error", "accelserve_policy must be one of")
    r = stack.post(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5},
    )
    assert_error(r, 400, "invalid_request_error", "repetition_penalty")


def test_unknown_model_is_404(stack):
    r = stack.post("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    err = assert_error(r, 404, "invalid_request_error", "'gpt-4o' does not exist")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        stack.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_prompt_too_long_is_413(stack):
    r = stack.post("/v1/chat/completions", {"model": "overflow", "messages": [{"role": "user", "content": "x"}]})
    assert assert_error(r, 413, "invalid_request_error", "context window")["code"] == "context_length_exceeded"
    r = stack.post("/v1/completions", {"model": "overflow", "prompt": "x", "stream": True})
    assert_error(r, 413, "invalid_request_error", "context window")  # a stream refused before it starts


def test_no_device_is_503(stack):
    # the tiny engine has no real GPU path here: pin a device kind its inventory lacks
    r = stack.post(
        "/v1/chat/completions",
        {"model": "slow", "messages": [{"role": "user", "content": "x"}], "accelserve_policy": "gpu"},
    )
    assert assert_error(r, 503, "service_unavailable_error", "gpu")["code"] == "no_device_available"


def test_overloaded_is_429(stack):
    """Capacity 1 and a waiting line of 1: the third concurrent request is refused with 429."""
    body = {"model": "slow", "messages": [{"role": "user", "content": "busy"}], "max_tokens": 400}
    slow = stack.engines["slow"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running_req = pool.submit(stack.post, "/v1/chat/completions", body, timeout=60)
        waiting_req = pool.submit(stack.post, "/v1/chat/completions", body, timeout=60)
        deadline = time.time() + 10
        while time.time() < deadline:
            npu = next(s for s in slow.status() if s["device_id"] == "npu:0")
            if npu["active"] == 1 and npu["waiting"] == 1:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"requests never filled the slot and the line: {slow.status()}")
        r = stack.post("/v1/chat/completions", body)
        err = assert_error(r, 429, "rate_limit_error", "max_queue")
        assert err["code"] == "overloaded" and r.headers["retry-after"] == "1"
        deadline = time.time() + 10
        while not (running_req.done() and waiting_req.done()) and time.time() < deadline:
            for rid in list(stack.backends["slow"]["npu"].served):
                slow.cancel(rid)  # end the long replies early; both were admitted, so both answer 200
            time.sleep(0.05)
        assert running_req.result().status_code == 200
        assert waiting_req.result().status_code == 200


def test_error_mid_stream_is_reported_in_the_stream(stack):
    body = {"model": "flaky", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "partial"
    assert "device lost mid-stream" in json.loads(events[1])["error"]["message"]
    assert events[-1] == "[DONE]"
    with pytest.raises(openai.APIError, match="device lost"):
        list(
            stack.client().chat.completions.create(
                model="flaky", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    r = stack.post("/v1/chat/completions", {**body, "stream": False})
    assert_error(r, 500, "server_error", "device lost mid-stream")


# ---- cancellation, metrics, health ------------------------------------------------------------------


def test_client_disconnect_cancels_generation_and_frees_the_slot(stack):
    slow = stack.engines["slow"]
    backend = stack.backends["slow"]["npu"]
    before = stack.metrics()
    body = {"model": "slow", "messages": [{"role": "user", "content": "long"}], "stream": True, "max_tokens": 400}
    with httpx.Client(timeout=10) as http, http.stream("POST", f"{stack.url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        request_id = json.loads(first.removeprefix("data: "))["id"].removeprefix("chatcmpl-")
        assert backend.served[-1] == request_id
        # leaving the block closes the connection mid-stream (400 words at 50 ms would take 20 s)
    deadline = time.time() + 5
    while time.time() < deadline:
        npu = next(s for s in slow.status() if s["device_id"] == "npu:0")
        if request_id in backend.cancelled and npu["active"] == 0:
            break
        time.sleep(0.02)
    assert request_id in backend.cancelled, "the backend never saw the cancel"
    assert next(s for s in slow.status() if s["device_id"] == "npu:0")["active"] == 0
    # the freed slot (capacity 1) serves the next request, instead of it queueing behind the 20 s reply
    stream = stack.client().chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "next"}], stream=True
    )
    assert next(iter(stream)).choices[0].delta.content
    assert next(s for s in slow.status() if s["device_id"] == "npu:0")["waiting"] == 0
    stream.close()
    deadline = time.time() + 5
    while time.time() < deadline and next(s for s in slow.status() if s["device_id"] == "npu:0")["active"]:
        time.sleep(0.02)
    after = stack.metrics()
    key = (
        "accelserve_requests_total",
        (("device", "npu:0"), ("endpoint", "chat"), ("model", "slow"), ("status", "499")),
    )
    assert after.get(key, 0) == before.get(key, 0) + 2


def test_metrics_move_after_requests(stack):
    before = stack.metrics()
    client = stack.client()
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "count me"}])
    stack.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 5})
    after = stack.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    ok = {"model": "tiny", "device": "npu:0"}
    assert delta("accelserve_requests_total", **ok, status="200", endpoint="chat") == 2
    assert delta("accelserve_requests_total", model="tiny", device="none", status="400", endpoint="chat") == 0
    assert delta("accelserve_generated_tokens_total", **ok) == 8  # two replies of three words + EOS
    assert delta("accelserve_time_to_first_token_seconds_count", **ok) == 2
    assert delta("accelserve_request_duration_seconds_count", **ok) == 2
    assert after[("accelserve_queue_depth", (("device", "npu:0"), ("model", "tiny")))] == 0
    assert after[("accelserve_in_flight_requests", (("model", "tiny"),))] == 0


def test_metrics_count_refused_requests(stack):
    before = stack.metrics()
    stack.post("/v1/chat/completions", {"model": "overflow", "messages": [{"role": "user", "content": "x"}]})
    after = stack.metrics()
    key = (
        "accelserve_requests_total",
        (("device", "none"), ("endpoint", "chat"), ("model", "overflow"), ("status", "413")),
    )
    assert after.get(key, 0) == before.get(key, 0) + 1


def test_health_reports_devices_and_turns_503_when_none_is_healthy(stack):
    r = httpx.get(f"{stack.url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["ok"] is True
    devices = {d["device_id"]: d for d in r.json()["models"]["tiny"]["devices"]}
    assert set(devices) == {"cpu:0", "gpu:0", "npu:0"} and devices["npu:0"]["simulated"] is True
    flaky = stack.engines["flaky"]
    for d in flaky.devices:
        flaky.health.mark_failure(d.id, "test: forced down")
    try:
        r = httpx.get(f"{stack.url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["ok"] is False
        assert r.json()["models"]["flaky"]["devices"][0]["unhealthy_reason"].startswith("test: forced down")
    finally:
        for d in flaky.devices:
            flaky.health.mark_success(d.id)


# ---- authentication and binding ---------------------------------------------------------------------


def test_api_key_is_enforced(stack):
    with running(create_app(stack.engines, api_key=KEY)) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert assert_error(r, 401, "invalid_request_error", "missing api key")["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"}, timeout=10)
        assert_error(r, 401, "invalid_request_error", "incorrect api key")
        r = httpx.get(f"{url}/metrics", timeout=10)
        assert r.status_code == 401
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        ids = [m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).models.list()]
        assert "tiny" in ids
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")


def test_non_loopback_bind_needs_a_key_or_an_explicit_opt_out(caplog):
    with pytest.raises(ValueError, match="--api-key"):
        check_bind("0.0.0.0", None, allow_insecure=False)
    check_bind("0.0.0.0", "secret", allow_insecure=False)
    check_bind("127.0.0.1", None, allow_insecure=False)
    with caplog.at_level(logging.WARNING, logger="plugin.serve.server"):
        check_bind("0.0.0.0", None, allow_insecure=True)
    assert "WITHOUT AN API KEY" in caplog.text


def test_create_app_needs_an_engine():
    with pytest.raises(ValueError, match="at least one engine"):
        create_app({})


# ---- the real engine path: tiny checkpoint, real backend on the CPU ---------------------------------


def test_real_engine_on_cpu_end_to_end(tiny_llama, accelserve_home):
    """No fakes below the server: the tiny checkpoint is exported/loaded by the default factory on the CPU."""
    from plugin.engine.devices import discover_devices

    cpu = [d for d in discover_devices() if d.kind == "cpu" and not d.simulated]
    engine = Engine(resolve_model(tiny_llama), devices=cpu, cost_model=CostModel(path=None))
    with engine, running(create_app({"tiny-real": engine})) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-real", messages=[{"role": "user", "content": "hi"}], max_tokens=6
        )
        reply = raw.parse()
        placement = reply.model_extra["accelserve"]
        assert placement["device"] == "cpu" and placement["simulated"] is False
        assert placement["backend"] in ("onnxruntime-genai", "torch")
        assert raw.headers["x-accelserve-provider"] == placement["provider"]
        assert 1 <= reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
        streamed = list(
            client.chat.completions.create(
                model="tiny-real", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
        body = {"model": "tiny-real", "messages": [{"role": "user", "content": "hi " * 300}], "max_tokens": 8}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert_error(r, 413, "invalid_request_error", "context length")


def _npu(engine: Engine) -> dict:
    return next(s for s in engine.status() if s["device_id"] == "npu:0")


def _wait(condition, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_client_leaving_a_non_streamed_or_queued_request_cancels_it(stack):
    """Without a stream the server polls for the disconnect: a client that gives up frees the slot and the line."""
    slow, backend = stack.engines["slow"], stack.backends["slow"]["npu"]
    body = {"model": "slow", "messages": [{"role": "user", "content": "long"}], "max_tokens": 400}
    served_before = len(backend.served)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # two impatient clients: one gets the only slot, the other waits in line; both time out after 1 s
        calls = [pool.submit(stack.post, "/v1/chat/completions", body, timeout=1.0) for _ in range(2)]
        assert _wait(lambda: _npu(slow)["active"] == 1 and _npu(slow)["waiting"] == 1)
        for call in calls:
            with pytest.raises(httpx.ReadTimeout):
                call.result()
    assert _wait(lambda: _npu(slow)["active"] == 0 and _npu(slow)["waiting"] == 0), slow.status()
    running_id = backend.served[served_before]
    assert running_id in backend.cancelled, "the running request was not cancelled"
    # the queued one never reached the backend, or was cancelled at once if it got the slot as the first left
    assert all(rid in backend.cancelled for rid in backend.served[served_before:])


def test_health_shows_a_crashed_backend_as_unhealthy(stack):
    """A backend whose worker died (e.g. the torch batching thread) makes its device unhealthy on /health."""
    stack.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "warm up"}])
    served = next(b for b in stack.backends["tiny"].values() if b.served)
    served.crashed = "scheduler crashed: RuntimeError: boom"
    try:
        r = httpx.get(f"{stack.url}/health", timeout=10)
        device = next(d for d in r.json()["models"]["tiny"]["devices"] if d["kind"] == served.device_kind)
        assert device["healthy"] is False and "boom" in device["unhealthy_reason"]
        assert device["loaded"][0]["healthy"] is False
    finally:
        served.crashed = ""


def test_a_bad_seed_is_a_400_and_the_device_stays_healthy(stack):
    r = stack.post(
        "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**40}
    )
    assert_error(r, 400, "invalid_request_error", "seed must be an integer from 0 to 2147483647")
    health = httpx.get(f"{stack.url}/health", timeout=10).json()
    assert all(d["healthy"] for d in health["models"]["tiny"]["devices"])
    ok = stack.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fine"}])
    assert ok.choices[0].message.content == "echo: fine"


def test_bad_request_keeps_the_keep_alive_connection(stack, caplog):
    """A 400 from request validation is a plain answer: no server-error log, the same connection goes on."""
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        again = client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "ok"}]}
        )
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == "echo: ok"
    assert "Exception in ASGI application" not in caplog.text and "unhandled error" not in caplog.text


def test_vllm_extensions_are_accepted_and_honoured(stack):
    """What guidellm and `vllm bench serve` send: ignore_eos, min_tokens, stop_token_ids, top_k,
    repetition_penalty and per-chunk usage."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": 6,
        "ignore_eos": True,
        "top_k": 5,
        "repetition_penalty": 1.0,
    }
    r = stack.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6  # the fake's EOS after "c" did not end it
    assert r.json()["choices"][0]["finish_reason"] == "length"
    body.update(ignore_eos=False, stop_token_ids=[1], min_tokens=0, max_tokens=20)
    r = stack.post("/v1/chat/completions", body)
    assert r.json()["usage"]["completion_tokens"] == 2 and r.json()["choices"][0]["message"]["content"] == "echo: a"
    body.update(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, min_tokens=3)
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=10) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    counts = [e["usage"]["completion_tokens"] for e in events if e.get("choices")]
    assert counts == sorted(counts) and counts[-1] >= 3  # min_tokens: the stop id at token 2 did not end it
    assert_error(stack.post("/v1/chat/completions", {**body, "min_tokens": -1}), 400, "invalid_request_error", "")


def test_logprobs_in_openai_shape_streamed_and_not(stack):
    client = stack.client()
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a b"}], logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens  # one entry per generated token, EOS included
    assert all(c.logprob == c.top_logprobs[0].logprob and len(c.top_logprobs) == 2 for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b"}])
    assert plain.choices[0].logprobs is None
    streamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a b"}], logprobs=True, stream=True
    )
    entries = [
        c for chunk in streamed for c in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])
    ]
    assert len(entries) == len(content) and all(c.top_logprobs == [] for c in entries)
    completion = client.completions.create(model="tiny", prompt="x y", logprobs=1, max_tokens=3)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and lp.text_offset[0] == 0
    assert_error(
        stack.post(
            "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
        ),
        400,
        "invalid_request_error",
        "top_logprobs needs logprobs",
    )
