"""Engine: placement → load → stream, fallback with back-off, bounded queues, cancellation, concurrency."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from plugin.engine.costmodel import CostModel
from plugin.engine.engine import ChatReply, Engine, NoDeviceAvailable, Overloaded
from plugin.engine.health import HealthTracker
from plugin.models.resolve import resolve_model

from fakes import FakeBackend, device


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tiny(tiny_llama, accelserve_home):
    return resolve_model(tiny_llama)


def make_engine(model, kinds=("cpu", "gpu", "npu"), backends=None, **kw):
    """An engine over fake devices whose factory hands out (and remembers) one FakeBackend per device."""
    backends = backends if backends is not None else {}
    made: dict[str, FakeBackend] = {}

    def factory(resolved, placement, dev):
        b = backends.get(dev.kind) or FakeBackend(dev.kind)
        made[dev.kind] = b
        return b

    kw.setdefault("cost_model", CostModel(path=None))
    engine = Engine(model, devices=[device(k) for k in kinds], backend_factory=factory, **kw)
    return engine, made


def test_chat_reports_placement_and_metrics(tiny):
    engine, _ = make_engine(tiny)
    with engine:
        reply = engine.chat([{"role": "user", "content": "hello there"}], max_new_tokens=16)
    assert isinstance(reply, ChatReply)
    assert reply.text == "echo: hello there"
    assert reply.placement.device == "npu"  # a tiny model goes to the NPU under auto
    assert reply.placement.simulated is True
    assert reply.placement.provider == "CPUExecutionProvider"
    assert reply.placement.reason
    assert reply.metrics.new_tokens == 4  # three words and the EOS token (counted, as on every backend)
    assert reply.metrics.ttft_s is not None and reply.metrics.ttft_s >= 0
    assert reply.finish_reason == "stop"


def test_streaming_matches_non_streaming(tiny):
    engine, _ = make_engine(tiny)
    with engine:
        msgs = [{"role": "user", "content": "one two three"}]
        streamed = list(engine.chat(msgs, stream=True))
        reply = engine.chat(msgs)
    assert "".join(c.text for c in streamed) == reply.text
    assert streamed[-1].finish_reason == "stop" and streamed[-1].metrics is not None
    assert all(c.finish_reason is None for c in streamed[:-1])


def test_fallback_when_load_fails(tiny):
    health = HealthTracker(clock=Clock())
    engine, _ = make_engine(tiny, backends={"npu": FakeBackend("npu", fail_load=True)}, health=health)
    with engine:
        reply = engine.chat([{"role": "user", "content": "hi"}])
    assert reply.placement.device != "npu"
    assert reply.placement.fallback_from == ("npu:0",)
    assert "provider missing" in reply.placement.reason
    assert not health.is_healthy("npu:0")
    assert "provider missing" in health.reason("npu:0")


def test_fallback_when_first_token_fails(tiny):
    engine, _ = make_engine(tiny, backends={"npu": FakeBackend("npu", fail_first=True)})
    with engine:
        reply = engine.chat([{"role": "user", "content": "hi"}])
        assert reply.text == "echo: hi"
        assert reply.placement.fallback_from == ("npu:0",)
        assert "device lost" in reply.placement.reason
        # the next request avoids the unhealthy NPU without trying it
        again = engine.chat([{"role": "user", "content": "again"}])
    assert again.placement.device == reply.placement.device
    assert again.placement.fallback_from == ()


def test_backoff_expiry_returns_device(tiny):
    clock = Clock()
    health = HealthTracker(base_backoff_s=10, clock=clock)
    npu = FakeBackend("npu", fail_first=True)
    engine, _ = make_engine(tiny, backends={"npu": npu}, health=health)
    with engine:
        assert engine.chat([{"role": "user", "content": "a"}]).placement.fallback_from == ("npu:0",)
        clock.now += 11  # back-off expired: the NPU is tried again, fails again, back-off doubles to 20 s
        assert engine.chat([{"role": "user", "content": "b"}]).placement.fallback_from == ("npu:0",)
        clock.now += 11
        assert not health.is_healthy("npu:0")
        npu.fail_first = False
        assert engine.chat([{"role": "user", "content": "c"}]).placement.device != "npu"
        clock.now += 10
        served = engine.chat([{"role": "user", "content": "d"}]).placement
        assert served.device == "npu" and served.fallback_from == ()
        assert health.reason("npu:0") == ""  # a success resets the failure count


def test_all_devices_failing_is_a_clear_error(tiny):
    engine, _ = make_engine(
        tiny,
        kinds=("cpu", "npu"),
        backends={"npu": FakeBackend("npu", fail_load=True), "cpu": FakeBackend("cpu", fail_load=True)},
    )
    with engine, pytest.raises(NoDeviceAvailable, match="provider missing"):
        engine.chat([{"role": "user", "content": "hi"}])


def test_pinned_absent_device_is_an_error_not_a_move(tiny):
    engine, made = make_engine(tiny, kinds=("cpu", "npu"))
    with engine, pytest.raises(NoDeviceAvailable, match="gpu"):
        engine.chat([{"role": "user", "content": "hi"}], policy="gpu")
    assert made == {}


def wait_until(condition, what: str, timeout_s: float = 30.0) -> None:
    """Poll until `condition()` holds; fail naming `what` (a deadline, never a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def device_status(engine, device_id):
    return next(s for s in engine.status() if s["device_id"] == device_id)


def test_bounded_queue_rejects_when_full(tiny):
    gate = threading.Event()
    held = FakeBackend("npu", capacity=1, gate=gate)
    engine, _ = make_engine(tiny, kinds=("cpu", "npu"), backends={"npu": held}, max_queue=1, policy="npu")
    msgs = [{"role": "user", "content": "x"}]
    with engine:
        engine.preload()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(engine.chat, msgs)
            wait_until(lambda: device_status(engine, "npu:0")["active"] == 1, "the first request to run")
            waiting = pool.submit(engine.chat, msgs)
            wait_until(lambda: device_status(engine, "npu:0")["waiting"] == 1, "the second request to queue")
            with pytest.raises(Overloaded, match="max_queue"):
                engine.chat(msgs)
            gate.set()
            assert running.result().finish_reason == "stop"
            assert waiting.result().finish_reason == "stop"
    assert held.max_running == 1


def test_kv_budget_admits_only_what_fits_and_refuses_what_never_can(tiny):
    """The engine owns admission: with room for one request's KV cache, two requests run one after the other."""
    from backends.base import ContextOverflowError

    gate = threading.Event()
    # budget for one sequence of <= 100 tokens at 1 byte a token; the batch slots alone would allow 4
    held = FakeBackend("npu", capacity=4, gate=gate, kv_budget_bytes=100, kv_bytes_per_token=1)
    engine, _ = make_engine(tiny, kinds=("cpu", "npu"), backends={"npu": held}, policy="npu")
    msgs = [{"role": "user", "content": "x"}]
    with engine:
        engine.preload()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(engine.chat, msgs, max_new_tokens=60)
            wait_until(lambda: device_status(engine, "npu:0")["active"] == 1, "the first request to run")
            second = pool.submit(engine.chat, msgs, max_new_tokens=60)
            wait_until(lambda: device_status(engine, "npu:0")["waiting"] == 1, "the second request to wait for memory")
            gate.set()
            assert first.result().finish_reason == "stop" and second.result().finish_reason == "stop"
        assert held.max_running == 1
        with pytest.raises(ContextOverflowError, match="KV budget"):
            engine.chat(msgs, max_new_tokens=200)


def test_crashed_backend_shows_unhealthy_and_requests_move(tiny):
    engine, made = make_engine(tiny, kinds=("cpu", "npu"))
    with engine:
        assert engine.chat([{"role": "user", "content": "x"}]).placement.device_id == "npu:0"
        made["npu"].crashed = "scheduler crashed: RuntimeError: boom"
        npu = device_status(engine, "npu:0")
        assert npu["healthy"] is False and "boom" in npu["unhealthy_reason"]
        reply = engine.chat([{"role": "user", "content": "y"}])
        assert reply.placement.device_id == "cpu:0"
        assert "unhealthy" in reply.placement.reason


def test_eight_concurrent_chats_get_their_own_text(tiny):
    engine, made = make_engine(
        tiny,
        kinds=("cpu", "gpu", "npu"),
        backends={"npu": FakeBackend("npu", token_delay_s=0.01), "gpu": FakeBackend("gpu", token_delay_s=0.01)},
    )
    with engine, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {i: pool.submit(engine.chat, [{"role": "user", "content": f"request {i}"}]) for i in range(8)}
        replies = {i: f.result() for i, f in futures.items()}
    for i, reply in replies.items():
        assert reply.text == f"echo: request {i}"
    assert sum(len(b.served) for b in made.values()) == 8


def test_cancel_frees_capacity(tiny):
    gate = threading.Event()
    held = FakeBackend("npu", capacity=1, words=200, gate=gate, hold_after=1)  # the first token, then hold
    engine, _ = make_engine(tiny, kinds=("cpu", "npu"), backends={"npu": held}, policy="npu")
    with engine:
        stream = engine.chat([{"role": "user", "content": "long"}], stream=True)
        first = next(stream)
        assert first.text
        stream.close()  # the caller walks away: the engine must cancel the backend
        wait_until(lambda: device_status(engine, "npu:0")["active"] == 0, "the cancelled request to free its slot")
        assert first.request_id in held.cancelled
        gate.set()
        # capacity is back: the next request is served on the same single-slot backend
        assert engine.chat([{"role": "user", "content": "next"}], max_new_tokens=8).finish_reason == "length"


async def test_achat_streams_from_callers_loop(tiny):
    engine, _ = make_engine(tiny)
    with engine:
        chunks = [c async for c in engine.achat([{"role": "user", "content": "async hi"}])]
    assert "".join(c.text for c in chunks) == "echo: async hi"
    assert chunks[-1].metrics is not None


def test_unknown_generation_option_is_rejected(tiny):
    engine, _ = make_engine(tiny)
    with engine, pytest.raises(TypeError, match="max_tokens"):
        engine.chat([{"role": "user", "content": "x"}], max_tokens=3)


def test_status_reports_loaded_backends(tiny):
    engine, _ = make_engine(tiny)
    with engine:
        engine.chat([{"role": "user", "content": "x"}])
        status = {s["device_id"]: s for s in engine.status()}
        assert status["npu:0"]["loaded"][0]["provider"] == "CPUExecutionProvider"
        assert status["gpu:0"]["loaded"] == []
        assert engine.unload_idle() == 1
        assert {s["device_id"]: s for s in engine.status()}["npu:0"]["loaded"] == []


def test_engine_is_thread_safe_for_status_during_load(tiny):
    engine, _ = make_engine(tiny)
    stop = threading.Event()
    errors = []

    def poll():
        while not stop.is_set():
            try:
                engine.status()
            except Exception as e:  # a dashboard polling must never crash
                errors.append(e)

    t = threading.Thread(target=poll)
    t.start()
    with engine:
        for i in range(5):
            engine.chat([{"role": "user", "content": str(i)}])
    stop.set()
    t.join()
    assert errors == []


def test_measured_rates_feed_the_cost_model(tiny):
    costs = CostModel(path=None)
    engine, _ = make_engine(
        tiny, kinds=("cpu", "npu"), backends={"npu": FakeBackend("npu", token_delay_s=0.01)}, cost_model=costs
    )
    with engine:
        reply = engine.chat([{"role": "user", "content": "a b c d e f"}])
    npu = next(d for d in engine.devices if d.id == "npu:0")
    rates = costs.rates(npu, tiny.profile, reply.placement.precision)
    assert rates.decode_samples == 1 and rates.prefill_samples == 1
    assert rates.decode_tps == pytest.approx(reply.metrics.tokens_per_s)


def test_placement_reports_what_the_backend_really_holds(tiny):
    """The scheduler plans int4 for the NPU; a backend that loaded fp32 must be reported as fp32."""
    engine, _ = make_engine(tiny)
    with engine:
        planned = engine.predict(engine_request("x"))
        served = engine.chat([{"role": "user", "content": "x"}]).placement
    assert planned.precision == "int4"
    assert served.precision == "fp32"  # FakeBackend.capabilities() says fp32


def engine_request(text: str):
    from backends.base import GenerationRequest

    return GenerationRequest(messages=[{"role": "user", "content": text}])
