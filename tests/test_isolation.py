"""Backends in their own processes: a segfault in one fails only the requests it held, the device backs
off and the work moves to another device, and the backend comes back in a new process."""

from __future__ import annotations

import time

import pytest

from backends.base import GenerationRequest
from backends.isolated import IsolatedBackend
from plugin.engine.costmodel import CostModel
from plugin.engine.engine import Engine
from plugin.engine.health import HealthTracker
from plugin.models.resolve import resolve_model

from fakes import crashing_factory, device

BACKOFF_S = 3.0


@pytest.fixture
def engine(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_HOME", str(tmp_path))
    e = Engine(
        resolve_model(tiny_llama),
        policy="energy",  # prefers the NPU, may fall back
        devices=[device("cpu"), device("npu")],
        backend_factory=crashing_factory,
        cost_model=CostModel(path=None),
        # long enough that a loaded CI machine still places the next request inside the back-off (1 s was not)
        health=HealthTracker(base_backoff_s=BACKOFF_S),
        isolate_backends=True,
    )
    with e:
        yield e


def chat(engine: Engine, text: str):
    return list(engine.chat([{"role": "user", "content": text}], stream=True))


def npu_backend(engine: Engine) -> IsolatedBackend:
    slot = next(s for s in engine._slots.values() if s.device.id == "npu:0")
    assert isinstance(slot.backend, IsolatedBackend)
    return slot.backend


def test_a_segfault_mid_stream_fails_that_request_only_and_the_backend_comes_back(engine):
    ok = chat(engine, "hello there")
    assert "".join(c.text for c in ok) == "echo: hello there" and ok[-1].placement.device_id == "npu:0"
    first_pid = npu_backend(engine)._proc.pid

    crashed = chat(engine, "segfault mid please")
    assert crashed[0].text and crashed[-1].finish_reason == "error"  # some text came, then the clear error
    assert "process died (killed by SIGSEGV)" in crashed[-1].error
    assert not npu_backend(engine).health().healthy

    moved = chat(engine, "still there?")  # the NPU is backing off: the CPU serves, nothing is lost
    assert "".join(c.text for c in moved) == "echo: still there?" and moved[-1].placement.device_id == "cpu:0"
    assert "SIGSEGV" in moved[-1].placement.reason

    time.sleep(BACKOFF_S + 0.2)  # the back-off passes: the NPU backend is loaded again, in a new process
    back = chat(engine, "welcome back")
    assert back[-1].placement.device_id == "npu:0" and "".join(c.text for c in back) == "echo: welcome back"
    assert npu_backend(engine)._proc.pid != first_pid


def test_a_segfault_before_the_first_token_is_placed_again(engine):
    reply = chat(engine, "segfault before anything")
    assert reply[-1].finish_reason == "stop" and reply[-1].placement.device_id == "cpu:0"
    assert reply[-1].placement.fallback_from == ("npu:0",)


def test_a_bad_request_crosses_the_process_as_a_bad_request(engine):
    with pytest.raises(ValueError, match="the fake backend refuses this request"):
        chat(engine, "a bad request")
    assert all(d["healthy"] for d in engine.status())  # not a device failure, nothing moved


def test_a_duplicate_request_id_is_refused_by_the_parent(engine):
    chat(engine, "load it")
    backend = npu_backend(engine)
    request = GenerationRequest(prompt="x", request_id="same", prompt_ids=[1])
    first = backend.generate(request)
    with pytest.raises(ValueError, match="already generating"):
        backend.generate(GenerationRequest(prompt="x", request_id="same", prompt_ids=[1]))
    assert "".join(c.text for c in first) == "echo: x"  # the first is untouched


def test_a_real_backend_isolated_answers_like_one_in_process(tiny_llama, accelserve_home):
    from plugin.engine.devices import discover_devices

    cpu = [d for d in discover_devices() if d.kind == "cpu" and not d.simulated]
    messages = [{"role": "user", "content": "hi"}]
    replies = []
    for isolate in (False, True):
        with Engine(
            resolve_model(tiny_llama), devices=cpu, cost_model=CostModel(path=None), isolate_backends=isolate
        ) as e:
            replies.append(e.chat(messages, max_new_tokens=8))
            if isolate:
                slot = next(iter(e._slots.values()))
                assert isinstance(slot.backend, IsolatedBackend) and slot.backend._proc.is_alive()
    assert replies[0].text == replies[1].text and replies[0].metrics.new_tokens == replies[1].metrics.new_tokens
    assert replies[1].placement.provider == replies[0].placement.provider  # what really ran, reported through
