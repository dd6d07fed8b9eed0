"""Server limits as behaviour: streams per client (429), the request deadline (504 / a final error event),
draining on shutdown (503 for new work, running streams end cleanly), SIGTERM on a real process, CORS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_server import make_engine, running

from plugin.models.resolve import resolve_model
from plugin.serve.limits import ServerLimits
from plugin.serve.server import create_app

from fakes import FakeBackend

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ACCELSERVE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def held(tiny_llama, home) -> Iterator[tuple[object, threading.Event, FakeBackend]]:
    """An engine whose backend holds every reply after its first token until the test sets the gate."""
    gate = threading.Event()
    backend = FakeBackend("cpu", gate=gate, hold_after=1, words=50)
    engine = make_engine(resolve_model(tiny_llama), {"cpu": backend}, kinds=("cpu",))
    try:
        yield engine, gate, backend
    finally:
        gate.set()
        engine.close()


def events(lines: Iterator[str]) -> Iterator[dict | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def test_streams_per_client_are_limited_and_released(held):
    engine, gate, _ = held
    app = create_app({"tiny": engine}, limits=ServerLimits(max_streams_per_client=2))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as first:
            assert first.status_code == 200
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as second:
                assert second.status_code == 200
                # a third generation from the same address is refused while two run (a plain request too)
                r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "too_many_streams"
                assert "limit per client is 2" in r.json()["error"]["message"]
                r = httpx.post(f"{url}/api/chat", json={"model": "tiny", "messages": CHAT["messages"]}, timeout=30)
                assert r.status_code == 429 and "limit per client" in r.json()["error"]
                gate.set()
                assert list(events(second.iter_lines()))[-1] == "[DONE]"
            assert list(events(first.iter_lines()))[-1] == "[DONE]"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert dict(app.state.gate.streams) == {}  # every ticket was given back
        assert 'accelserve_rejected_requests_total{reason="too_many_streams"} 2.0' in client.get("/metrics").text


def test_request_deadline_is_504_or_a_final_error_event_and_cancels_the_work(held):
    engine, _, backend = held
    app = create_app({"tiny": engine}, limits=ServerLimits(request_timeout_s=0.5))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "request_timeout" and r.json()["error"]["type"] == "timeout_error"
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            assert s.status_code == 200  # the first token came in time; the deadline passes mid-stream
            got = list(events(s.iter_lines()))
        assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "request_timeout"
        deadline = time.time() + 5
        while backend.active and time.time() < deadline:
            time.sleep(0.02)
        assert not backend.active and len(backend.cancelled) == 2  # both generations were cancelled
        assert all(d["healthy"] for d in engine.status())  # a timeout is not a device failure


def test_drain_refuses_new_work_and_ends_running_streams_at_its_deadline(held):
    engine, _, _ = held
    app = create_app({"tiny": engine})
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            assert s.status_code == 200
            app.state.gate.drain.begin(0.5)
            r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert r.headers["retry-after"] == "5"
            got = list(events(s.iter_lines()))
        assert got[-2]["error"]["code"] == "shutting_down" and got[-1] == "[DONE]"


def test_cors_is_off_by_default_and_on_for_listed_origins(held):
    engine, gate, _ = held
    gate.set()
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    with running(create_app({"tiny": engine})) as url:
        r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    limits = ServerLimits(cors_origins=("https://app.example",))
    with running(create_app({"tiny": engine}, limits=limits)) as url:
        r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_model_card_does_not_show_the_servers_paths(held):
    engine, gate, _ = held
    gate.set()
    with running(create_app({"tiny": engine})) as url:
        text = httpx.get(f"{url}/v1/models").text
    assert str(engine.model.path.parent) not in text and engine.model.path.name in text


def test_limits_refuse_nonsense_settings():
    with pytest.raises(ValueError, match="max_body_bytes must be an integer >= 1"):
        ServerLimits(max_body_bytes=0)
    with pytest.raises(ValueError, match="request_timeout_s must be a number of seconds > 0"):
        ServerLimits(request_timeout_s=float("nan"))


# ---- SIGTERM on a real server process ---------------------------------------------------------------

_SERVER = textwrap.dedent(
    """
    import socket, sys
    sys.path.insert(0, {tests!r})
    from fakes import FakeBackend
    from test_server import make_engine
    from plugin.models.resolve import resolve_model
    from plugin.serve.limits import ServerLimits
    from plugin.serve.server import create_app, run_app

    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen()
    backend = FakeBackend("cpu", token_delay_s=0.05, words={words})
    engine = make_engine(resolve_model({model!r}), {{"cpu": backend}}, kinds=("cpu",))
    print(sock.getsockname()[1], flush=True)
    try:
        run_app(create_app({{"tiny": engine}}, limits=ServerLimits(drain_timeout_s={drain})), "127.0.0.1", 0, [sock])
    finally:
        engine.close()
    print("exited cleanly", flush=True)
    """
)


def _start(tiny_llama: Path, words: int, drain: float) -> tuple[subprocess.Popen, str]:
    code = _SERVER.format(tests=str(Path(__file__).parent), model=str(tiny_llama), words=words, drain=drain)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server process did not come up")


@pytest.mark.parametrize(("words", "drain", "ends_with"), [(20, 10.0, "stop"), (400, 1.0, "shutting_down")])
def test_sigterm_drains_a_real_server(tiny_llama, home, words, drain, ends_with):
    """A short stream finishes within the drain; a long one is ended with an error event at its deadline.
    Either way the client gets [DONE], new connections are refused, and the process exits 0."""
    proc, url = _start(tiny_llama, words, drain)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
                lines = s.iter_lines()
                first = next(events(lines))
                assert first["choices"][0]["delta"]["role"] == "assistant"
                proc.send_signal(signal.SIGTERM)
                rest = list(events(lines))
            with pytest.raises(httpx.TransportError):
                httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
        assert rest[-1] == "[DONE]"
        last = rest[-2]
        if ends_with == "stop":
            assert last["choices"][0]["finish_reason"] == "stop"
        else:
            assert last["error"]["code"] == "shutting_down"
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "exited cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()
