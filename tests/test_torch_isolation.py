"""One bad request never takes the torch backend down: every step of the batching loop fails only the rows it
concerns, and only an unrecoverable device error stops the runner (which then says a restart is required).

Each test runs a few greedy streams alone first, then again beside a poisoned request, and checks that the
others' tokens are exactly what they were alone.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_torch_backend import PROMPTS, collect, ids_of, run_concurrently, slow_down

from backends.base import BackendError, GenerationRequest, SamplingParams
from backends.torch import kvbatch
from backends.torch.backend import TorchBackend
from backends.torch.sampling import BatchSampler

PARAMS = SamplingParams(max_new_tokens=30)
FAKE_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (fake)"


@pytest.fixture
def backend(tiny_model_factory):
    b = TorchBackend(tiny_model_factory("llama"), device="cpu")
    b.load()
    b.eos_ids = frozenset()  # every stream runs to max_new_tokens, so they surely overlap
    yield b
    b.unload()


def alone(backend: TorchBackend, prompts: list[str], params: SamplingParams = PARAMS) -> list[list[int]]:
    return [ids_of(collect(backend.generate(GenerationRequest(prompt=p, sampling=params)))) for p in prompts]


def requests(prompts: list[str], params: SamplingParams = PARAMS) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=p, sampling=params, request_id=f"r{i}") for i, p in enumerate(prompts)]


def assert_healthy_and_idle(backend: TorchBackend) -> None:
    deadline = time.time() + 5
    while backend.health().active_requests and time.time() < deadline:
        time.sleep(0.01)
    health = backend.health()
    assert health.healthy and not health.restart_required, health.detail
    assert health.active_requests == 0


def test_tiny_temperature_is_greedy_and_harms_no_one(backend):
    """temperature=1e-39 (accepted by validation) used to overflow to NaN probabilities and kill the runner."""
    ref = alone(backend, PROMPTS[:3])
    tiny = GenerationRequest(
        prompt=PROMPTS[3], sampling=SamplingParams(max_new_tokens=30, temperature=1e-39, top_p=0.9, seed=3)
    )
    results = run_concurrently(backend, [*requests(PROMPTS[:3]), tiny])
    assert [ids_of(c) for c in results[:3]] == ref
    assert results[3][-1].finish_reason == "length"
    assert ids_of(results[3]) == alone(backend, PROMPTS[3:4])[0]  # the limit of sampling as temperature -> 0
    assert_healthy_and_idle(backend)


def poison_logits(backend: TorchBackend, request_id: str, at_token: int, value: float = float("nan")) -> dict:
    """Make one decode step emit `value` logits for one request's row once it has `at_token` tokens."""
    runner, model = backend._runner, backend.model
    inner = model.forward
    state = {"hits": 0}

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        rows = runner.rows
        if kwargs["input_ids"].shape == (len(rows), 1) and not state["hits"]:  # a decode step of the batch
            for i, w in enumerate(rows):
                if w.request_id == request_id and len(w.generated) >= at_token:
                    state["hits"] += 1
                    out.logits[i] = value
        return out

    model.forward = forward
    return state


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_one_request(backend, value):
    ref = alone(backend, PROMPTS[:3])
    slow_down(backend, 0.002)
    state = poison_logits(backend, "r1", at_token=5, value=value)
    results = run_concurrently(backend, requests(PROMPTS[:3]))
    assert state["hits"] == 1
    failed = results[1]
    assert failed[-1].finish_reason == "error" and "non-finite logits" in failed[-1].error
    assert ids_of(failed) == ref[1][: len(ids_of(failed))]  # what it streamed before was right
    assert [ids_of(results[0]), ids_of(results[2])] == [ref[0], ref[2]]
    assert_healthy_and_idle(backend)
    assert alone(backend, PROMPTS[1:2]) == [ref[1]]  # the same request is served in full again


@pytest.mark.parametrize("batched", [True, False], ids=["prefilled-together", "prefilled-alone"])
def test_nan_at_prefill_fails_only_that_request(backend, batched):
    """Three requests prefilled (together, as on CUDA, or one by one); one row's logits are NaN."""
    ref = alone(backend, PROMPTS[:2])
    backend._runner.batched_prefill = batched
    slow_down(backend, 0.002)
    poisoned = backend.tokenizer.encode(PROMPTS[4])
    inner = backend.model.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # a prefill (left-padded when several prompts share it)
            for i, row in enumerate(ids.tolist()):
                if row[-len(poisoned) :] == poisoned:
                    out.logits[i] = float("nan")
        return out

    backend.model.forward = forward
    results = run_concurrently(backend, requests([PROMPTS[0], PROMPTS[4], PROMPTS[1]]))
    assert results[1][-1].finish_reason == "error" and "non-finite logits" in results[1][-1].error
    assert ids_of(results[1]) == []
    assert [ids_of(results[0]), ids_of(results[2])] == ref
    assert backend._runner.peak_batch == 2
    assert_healthy_and_idle(backend)


def test_a_row_whose_token_choice_raises_fails_alone(backend, monkeypatch):
    """The batched choice raises for the whole batch; choosing row by row isolates the one that raises."""
    ref = alone(backend, PROMPTS[:3])
    inner = BatchSampler.choose

    def choose(self, logits):
        if any(r.params.top_k == 7 for r in self.rows):
            raise RuntimeError("sampling kernel failed (fake)")
        return inner(self, logits)

    monkeypatch.setattr(BatchSampler, "choose", choose)
    slow_down(backend, 0.002)
    bad = GenerationRequest(prompt=PROMPTS[3], sampling=SamplingParams(max_new_tokens=30, top_k=7), request_id="bad")
    results = run_concurrently(backend, [*requests(PROMPTS[:3]), bad])
    assert results[3][-1].finish_reason == "error" and "sampling kernel failed" in results[3][-1].error
    assert [ids_of(c) for c in results[:3]] == ref
    assert_healthy_and_idle(backend)


def test_oom_while_joining_fails_the_joining_request_and_keeps_the_batch(backend, monkeypatch):
    ref = alone(backend, PROMPTS[:3])
    inner = kvbatch._stack_rows
    state = {"calls": 0, "raised": 0, "armed": False}

    def stack_rows(old, new, grow, new_pad):
        state["calls"] += state["armed"]
        if state["calls"] == 3 and not state["raised"]:  # layer 0 grew (keys, values), layer 1's keys fail
            state["raised"] += 1
            raise torch.cuda.OutOfMemoryError(FAKE_OOM)
        return inner(old, new, grow, new_pad)

    monkeypatch.setattr(kvbatch, "_stack_rows", stack_rows)
    slow_down(backend, 0.002)
    running = [backend.generate(r) for r in requests(PROMPTS[:2])]
    firsts = [next(s) for s in running]
    deadline = time.time() + 10
    while len(backend._runner.rows) < 2 and time.time() < deadline:  # both decode in one batch
        time.sleep(0.001)
    state["armed"] = True
    late = collect(backend.generate(GenerationRequest(prompt=PROMPTS[2], sampling=PARAMS, request_id="late")))
    rest = [firsts[i : i + 1] + collect(s) for i, s in enumerate(running)]
    assert state["raised"] == 1
    assert late[-1].finish_reason == "error"
    assert "out of memory" in late[-1].error and "joining the running batch of 2" in late[-1].error
    assert ids_of(late) == ref[2][:1]  # only its prefill token
    assert [ids_of(c) for c in rest] == ref[:2]  # the rolled-back cache is exactly the old one
    assert_healthy_and_idle(backend)


def test_oom_while_removing_rows_fails_one_more_and_keeps_the_rest(backend, monkeypatch):
    short = SamplingParams(max_new_tokens=6)
    ref_long, ref_short = alone(backend, PROMPTS[:3]), alone(backend, PROMPTS[3:4], short)[0]
    inner = kvbatch.selected
    state = {"raised": 0}

    def selected(batch, keep):
        if not state["raised"]:
            state["raised"] += 1
            raise torch.cuda.OutOfMemoryError(FAKE_OOM)
        return inner(batch, keep)

    monkeypatch.setattr(kvbatch, "selected", selected)
    slow_down(backend, 0.002)
    quick = GenerationRequest(prompt=PROMPTS[3], sampling=short, request_id="quick")
    results = run_concurrently(backend, [*requests(PROMPTS[:3]), quick])
    assert state["raised"] == 1
    assert ids_of(results[3]) == ref_short and results[3][-1].finish_reason == "length"  # it had finished
    errors = [i for i, c in enumerate(results[:3]) if c[-1].finish_reason == "error"]
    assert len(errors) == 1 and "out of memory" in results[errors[0]][-1].error
    for i in set(range(3)) - set(errors):
        assert ids_of(results[i]) == ref_long[i]
    assert_healthy_and_idle(backend)


def test_oom_inside_a_decoder_layer_fails_one_request(backend):
    """Layer 0 has already appended this step's column when layer 1 runs out of memory: rolled back."""
    ref = alone(backend, PROMPTS[:3])
    state = {"raised": 0}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:2] == (3, 1) and not state["raised"]:
            state["raised"] += 1
            raise torch.cuda.OutOfMemoryError(FAKE_OOM)

    backend.model.model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    slow_down(backend, 0.002)
    results = run_concurrently(backend, requests(PROMPTS[:3]))
    assert state["raised"] == 1
    errors = [c for c in results if c[-1].finish_reason == "error"]
    assert len(errors) == 1 and "out of memory" in errors[0][-1].error
    for chunks, expected in zip(results, ref, strict=True):
        if chunks[-1].finish_reason == "error":
            assert ids_of(chunks) == expected[: len(ids_of(chunks))]
        else:
            assert ids_of(chunks) == expected
    assert_healthy_and_idle(backend)


def test_a_model_error_in_a_step_fails_that_step_and_the_runner_carries_on(backend):
    ref = alone(backend, PROMPTS[:2])
    state = {"raised": 0}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:2] == (2, 1) and not state["raised"]:
            state["raised"] += 1
            raise IndexError("index out of range in a custom kernel (fake)")

    handle = backend.model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    results = run_concurrently(backend, requests(PROMPTS[:2]))
    handle.remove()
    assert state["raised"] == 1
    assert all(c[-1].finish_reason == "error" and "IndexError" in c[-1].error for c in results)
    assert_healthy_and_idle(backend)
    assert alone(backend, PROMPTS[:2]) == ref


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"),
        RuntimeError("CUDA error: no kernel image is available for execution on the device"),
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    ],
    ids=["device-side-assert", "no-kernel-image", "illegal-address"],
)
def test_unrecoverable_cuda_error_stops_the_runner_and_says_restart(backend, error):
    state = {"raised": 0}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:2] == (2, 1) and not state["raised"]:
            state["raised"] += 1
            raise error

    backend.model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    results = run_concurrently(backend, requests(PROMPTS[:2]))
    assert state["raised"] == 1
    for chunks in results:
        assert chunks[-1].finish_reason == "error" and "restart required" in chunks[-1].error
    health = backend.health()
    assert not health.healthy and health.restart_required and "restart the process" in health.detail.lower()
    with pytest.raises(BackendError, match="restart required"):
        backend.generate(GenerationRequest(prompt="Hello"))


def test_out_of_memory_is_not_mistaken_for_a_broken_device():
    from backends.torch.errors import is_fatal, is_oom

    oom_text = RuntimeError("CUDA error: out of memory")
    assert is_oom(oom_text) and not is_fatal(oom_text)
    assert is_oom(torch.cuda.OutOfMemoryError(FAKE_OOM)) and not is_fatal(torch.cuda.OutOfMemoryError(FAKE_OOM))
    assert not is_fatal(ValueError("device-side assert"))  # only runtime errors from the device count
    assert is_fatal(RuntimeError("CUDA error: unspecified launch failure"))


# ---- through the engine: what a failure does to the device's health and to routing ----------------------------


@pytest.fixture
def gpu_engine(tiny_model_factory, accelserve_home):
    """An engine over a simulated GPU served by the real torch backend (on the CPU) and a fake CPU backend."""
    from plugin.engine.costmodel import CostModel
    from plugin.engine.engine import Engine
    from plugin.models.resolve import resolve_model

    from fakes import FakeBackend, device

    path = tiny_model_factory("llama")
    built: list[str] = []
    torch_backend = TorchBackend(path, device="cpu", simulated_device="gpu")
    cpu_backend = FakeBackend("cpu")

    def factory(resolved, placement, dev):
        built.append(dev.id)
        return torch_backend if dev.kind == "gpu" else cpu_backend

    engine = Engine(
        resolve_model(path), devices=[device("gpu"), device("cpu")], backend_factory=factory, cost_model=CostModel(None)
    )
    with engine:
        yield engine, torch_backend, built


def gpu_status(engine) -> dict:
    return next(d for d in engine.status() if d["device_id"] == "gpu:0")


def test_a_request_level_error_never_marks_the_device_unhealthy(gpu_engine):
    from plugin.engine.engine import EngineError

    engine, backend, built = gpu_engine
    assert engine.complete("Hello", policy="gpu", max_new_tokens=4).placement.device_id == "gpu:0"
    poisoned = backend.tokenizer.encode("naïve café")
    inner = backend.model.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        if kwargs["input_ids"][0].tolist() == poisoned:
            out.logits[:] = float("nan")
        return out

    backend.model.forward = forward
    with pytest.raises(EngineError, match="non-finite logits"):
        engine.complete("naïve café", policy="auto", max_new_tokens=4)
    assert engine.health.is_healthy("gpu:0") and gpu_status(engine)["healthy"]
    # the tiny temperature of the reproduction is served, on the same device
    reply = engine.complete("Hello", policy="gpu", max_new_tokens=4, temperature=1e-39)
    assert reply.placement.device_id == "gpu:0" and reply.placement.fallback_from == ()
    assert engine.health.is_healthy("gpu:0") and built == ["gpu:0"]


def test_the_engine_stops_routing_to_a_runner_that_needs_a_restart(gpu_engine):
    from plugin.engine.engine import NoDeviceAvailable

    engine, backend, built = gpu_engine
    assert engine.complete("Hello", policy="gpu", max_new_tokens=4).placement.device_id == "gpu:0"

    def hook(module, args, kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    backend.model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(NoDeviceAvailable, match="restart required"):
        engine.complete("Hello", policy="gpu", max_new_tokens=4)
    status = gpu_status(engine)
    assert not status["healthy"] and "restart required" in status["unhealthy_reason"]
    assert "retired until the process restarts" in engine.health.reason("gpu:0")
    # every later request goes elsewhere, and nothing is reloaded on the broken context, ever
    engine.health._clock = lambda: time.monotonic() + 10**6  # far past any back-off
    reply = engine.complete("Hello", policy="auto", max_new_tokens=4)
    assert reply.placement.device_id == "cpu:0"
    with pytest.raises(NoDeviceAvailable):
        engine.complete("Hello", policy="gpu", max_new_tokens=4)
    assert built == ["gpu:0", "cpu:0"]


def test_a_group_prefill_that_runs_out_of_memory_is_retried_one_by_one(backend):
    ref = alone(backend, PROMPTS[:3])
    inner = backend.model.forward
    state = {"raised": 0}

    def forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[0] > 1 and ids.shape[1] > 1:  # several prompts prefilled together
            state["raised"] += 1
            raise torch.cuda.OutOfMemoryError(FAKE_OOM)
        return inner(*args, **kwargs)

    backend.model.forward = forward
    backend._runner.batched_prefill = True  # as on CUDA: waiting prompts share one forward
    results = run_concurrently(backend, requests(PROMPTS[:3]))
    assert state["raised"] == 1
    assert [ids_of(c) for c in results] == ref and all(c[-1].finish_reason == "length" for c in results)
    assert_healthy_and_idle(backend)
