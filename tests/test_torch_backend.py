"""TorchBackend on tiny random models: batching correctness, streams, sampling, stops, OOM, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from backends.base import (
    Backend,
    BackendError,
    ContextOverflowError,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from backends.torch.backend import TorchBackend, resolve_device

PROMPTS = [
    "Hello",
    "The capital of France is Paris. The capital of Germany is",
    "def main():\n    return",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: !?.,;:",
    "naïve café 東京",
]
GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture
def make_backend(tiny_model_factory) -> Iterator:
    made: list[TorchBackend] = []

    def make(arch: str = "llama", **kwargs) -> TorchBackend:
        kwargs.setdefault("device", "cpu")
        b = TorchBackend(tiny_model_factory(arch), **kwargs)
        b.load()
        made.append(b)
        return b

    yield make
    for b in made:
        b.unload()


def collect(chunks) -> list[TokenChunk]:
    return list(chunks)


def ids_of(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks: list[TokenChunk]) -> str:
    return "".join(c.text for c in chunks)


def run_concurrently(backend: TorchBackend, requests: list[GenerationRequest]) -> list[list[TokenChunk]]:
    """Submit every request first (generate() enqueues eagerly), then read all streams on threads."""
    streams = [backend.generate(r) for r in requests]
    results: list[list[TokenChunk]] = [[] for _ in requests]

    def read(i: int) -> None:
        results[i] = list(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def slow_down(backend: TorchBackend, seconds: float = 0.004) -> None:
    """Make every forward pass take a little time so concurrency in the tests is not a race."""
    model = backend.model
    inner = model.forward

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return inner(*args, **kwargs)

    model.forward = forward


def test_is_a_backend(make_backend):
    assert isinstance(make_backend(), Backend)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral", "phi3"])
def test_batched_greedy_equals_sequential_and_hf_generate(make_backend, arch):
    backend = make_backend(arch)
    sequential = [ids_of(collect(backend.generate(GenerationRequest(prompt=p, sampling=GREEDY)))) for p in PROMPTS]
    # the single-stream loop agrees with transformers' own generate
    tok, model = backend.tokenizer, backend.model
    for prompt, got in zip(PROMPTS, sequential, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert got == ref[0, ids.shape[1] :].tolist()
    lengths = {len(tok.encode(p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS), "prompts must have different lengths to exercise padding"

    batched = run_concurrently(backend, [GenerationRequest(prompt=p, sampling=GREEDY) for p in PROMPTS])
    assert [ids_of(c) for c in batched] == sequential
    assert backend._runner.peak_batch == len(PROMPTS)
    assert all(c[-1].finish_reason in ("stop", "length") for c in batched)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompts_prefilled_together_equal_prefilled_alone(make_backend, arch):
    """CUDA's path (left-padded prompts in one forward, one group per decode step), run here on the CPU."""
    backend = make_backend(arch)
    sequential = [ids_of(collect(backend.generate(GenerationRequest(prompt=p, sampling=GREEDY)))) for p in PROMPTS]
    backend._runner.batched_prefill = True
    prefills = []
    inner = backend.model.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefills.append(kwargs["input_ids"].shape[0])
        return inner(*args, **kwargs)

    backend.model.forward = forward
    batched = run_concurrently(backend, [GenerationRequest(prompt=p, sampling=GREEDY) for p in PROMPTS])
    assert [ids_of(c) for c in batched] == sequential
    # every prompt prefilled exactly once, waiting ones together (the first may start alone if the runner
    # picks it up before the others are submitted)
    assert sum(prefills) == len(PROMPTS) and max(prefills) > 1, prefills


def test_request_added_mid_flight(make_backend):
    backend = make_backend("llama")
    long = SamplingParams(max_new_tokens=80)
    backend.eos_ids = frozenset()  # run every stream to its full length so they surely overlap
    first_alone = ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=long))))
    second_alone = ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[3], sampling=GREEDY))))
    slow_down(backend)

    events: list[str] = []
    first = backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=long, request_id="first"))
    first_chunks = [next(first) for _ in range(10)]
    second_chunks: list[TokenChunk] = []

    def read_second() -> None:
        for c in backend.generate(GenerationRequest(prompt=PROMPTS[3], sampling=GREEDY, request_id="second")):
            second_chunks.append(c)
        events.append("second done")

    t = threading.Thread(target=read_second)
    t.start()
    for c in first:
        first_chunks.append(c)
    events.append("first done")
    t.join(timeout=30)

    assert ids_of(first_chunks) == first_alone
    assert ids_of(second_chunks) == second_alone
    assert events[0] == "second done", "the shorter request joined mid-flight and should leave first"
    assert backend._runner.peak_batch == 2


def test_cancel_one_stream_leaves_others_intact(make_backend):
    backend = make_backend("qwen2")
    backend.eos_ids = frozenset()
    params = SamplingParams(max_new_tokens=60)
    alone = [ids_of(collect(backend.generate(GenerationRequest(prompt=p, sampling=params)))) for p in PROMPTS[:3]]
    slow_down(backend)
    requests = [GenerationRequest(prompt=p, sampling=params, request_id=f"r{i}") for i, p in enumerate(PROMPTS[:3])]
    streams = [backend.generate(r) for r in requests]
    results: dict[int, list[TokenChunk]] = {0: [], 2: []}

    def read(i: int) -> None:
        results[i] = list(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in (0, 2)]
    for t in threads:
        t.start()
    cancelled = [next(streams[1]) for _ in range(5)]
    assert backend.cancel("r1") is True
    rest = list(streams[1])
    assert rest[-1].finish_reason == "cancelled"
    assert sum(len(c.token_ids) for c in rest) <= 1  # stopped within one decode step
    cancelled.extend(rest)
    for t in threads:
        t.join(timeout=30)

    assert cancelled[-1].finish_reason == "cancelled"
    assert len(ids_of(cancelled)) < 60
    assert ids_of(cancelled) == alone[1][: len(ids_of(cancelled))]
    assert ids_of(results[0]) == alone[0]
    assert ids_of(results[2]) == alone[2]
    assert backend.cancel("r1") is False  # already gone
    assert backend.health().active_requests == 0


def test_abandoned_stream_is_cancelled(make_backend):
    backend = make_backend("llama")
    backend.eos_ids = frozenset()
    slow_down(backend)
    stream = backend.generate(GenerationRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=200)))
    next(stream)
    stream.close()  # the caller walked away: the slot must free up
    deadline = time.time() + 2
    while backend.health().active_requests and time.time() < deadline:
        time.sleep(0.01)
    assert backend.health().active_requests == 0


def test_per_request_sampling_in_one_batch(make_backend):
    backend = make_backend("llama")
    backend.eos_ids = frozenset()
    greedy_alone = ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[0], sampling=GREEDY))))

    def sampled(seed: int, **kw) -> SamplingParams:
        return SamplingParams(max_new_tokens=24, temperature=1.5, top_k=50, top_p=0.95, seed=seed, **kw)

    requests = [
        GenerationRequest(prompt=PROMPTS[0], sampling=GREEDY),
        GenerationRequest(prompt=PROMPTS[1], sampling=sampled(1)),
        GenerationRequest(prompt=PROMPTS[1], sampling=sampled(1)),
        GenerationRequest(prompt=PROMPTS[1], sampling=sampled(2)),
        GenerationRequest(prompt=PROMPTS[1], sampling=sampled(1, repetition_penalty=1.3)),
    ]
    out = [ids_of(c) for c in run_concurrently(backend, requests)]
    assert out[0] == greedy_alone  # a greedy row is untouched by its sampling neighbours
    assert out[1] == out[2]  # same seed, same text
    assert out[1] != out[3]  # another seed, another text
    assert out[1] != out[4]  # repetition penalty changes the choice
    greedy_ref = ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=GREEDY))))
    assert out[1] != greedy_ref  # temperature really sampled
    # reproducible across runs, alone as well as batched
    again = ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=sampled(1)))))
    assert again == out[1]


def test_repetition_penalty_greedy_matches_hf(make_backend):
    backend = make_backend("llama")
    params = SamplingParams(max_new_tokens=20, repetition_penalty=1.5)
    got = ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[2], sampling=params))))
    ids = torch.tensor([backend.tokenizer.encode(PROMPTS[2])])
    ref = backend.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, repetition_penalty=1.5
    )
    assert got == ref[0, ids.shape[1] :].tolist()


def test_stop_strings(make_backend):
    backend = make_backend("llama")
    backend.eos_ids = frozenset()
    params = SamplingParams(max_new_tokens=40)
    full = text_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=params))))
    assert len(full) > 12, f"the tiny model should produce some text, got {full!r}"
    stop = full[8:11]
    cut = full.index(stop)
    chunks = collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=SamplingParams(40, stop=(stop,)))))
    assert text_of(chunks) == full[:cut]
    assert chunks[-1].finish_reason == "stop"
    assert len(ids_of(chunks)) < 40


def test_streaming_text_equals_full_decode_and_chat_template(make_backend):
    backend = make_backend("llama")
    messages = [{"role": "user", "content": "What is the capital of France? 東京 🙂"}]
    params = SamplingParams(max_new_tokens=40)
    chunks = collect(backend.generate(GenerationRequest(messages=messages, sampling=params)))
    ids = ids_of(chunks)
    assert text_of(chunks) == backend.tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in c.text for c in chunks[:-1])
    prompt_ids = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chunks[0].prompt_tokens == len(prompt_ids)
    assert chunks[-1].finish_reason in ("stop", "length")
    # same ids as a raw prompt holding the rendered template
    rendered = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raw = collect(backend.generate(GenerationRequest(prompt=rendered, sampling=params)))
    assert ids_of(raw) == ids


def test_finish_reasons(make_backend):
    backend = make_backend("llama")
    chunks = collect(backend.generate(GenerationRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=3))))
    assert chunks[-1].finish_reason in ("length", "stop")
    if chunks[-1].finish_reason == "length":
        assert len(ids_of(chunks)) == 3
    # make EOS the certain choice: bias the lm_head towards it
    eos = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        backend.model.lm_head.bias = torch.nn.Parameter(torch.zeros(backend.model.config.vocab_size))
        backend.model.lm_head.bias[eos] = 1e4
    chunks = collect(backend.generate(GenerationRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=10))))
    assert chunks[-1].finish_reason == "stop"
    assert ids_of(chunks) == [eos]
    assert text_of(chunks) == ""


def test_context_overflow_raised_before_any_work(make_backend):
    backend = make_backend("llama")
    with pytest.raises(ContextOverflowError, match=r"context length 256.*max_new_tokens <="):
        backend.generate(GenerationRequest(prompt="Hello " * 50, sampling=SamplingParams(max_new_tokens=250)))
    assert backend.health().active_requests == 0


def test_bad_requests(make_backend, tiny_model_factory):
    backend = make_backend("llama")
    with pytest.raises(ValueError, match="empty"):
        backend.generate(GenerationRequest(prompt=""))
    backend.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        backend.generate(GenerationRequest(messages=[{"role": "user", "content": "hi"}]))
    with pytest.raises(BackendError, match="not loaded"):
        TorchBackend(tiny_model_factory("llama"), device="cpu").generate(GenerationRequest(prompt="hi"))
    with pytest.raises(BackendError, match="does not exist"):
        TorchBackend("no/such/model", device="cpu")
    with pytest.raises(ValueError, match="unknown device"):
        TorchBackend(tiny_model_factory("llama"), device="tpu")
    with pytest.raises(ValueError, match="max_batch_size"):
        TorchBackend(tiny_model_factory("llama"), device="cpu", max_batch_size=0)


def test_refuses_model_that_does_not_fit(tiny_model_factory):
    backend = TorchBackend(tiny_model_factory("llama"), device="cpu", memory_limit_bytes=10_000)
    with pytest.raises(BackendError, match=r"does not fit.*memory_limit_bytes"):
        backend.load()
    assert not backend.health().healthy


def test_kv_budget_makes_requests_wait_instead_of_overcommitting(tiny_model_factory, accelserve_home):
    """The backend reports its KV budget; the engine (the one owner of admission) holds what does not fit."""
    import concurrent.futures

    from plugin.engine.costmodel import CostModel
    from plugin.engine.engine import Engine
    from plugin.models.resolve import resolve_model

    from fakes import device

    path = tiny_model_factory("llama")
    probe = TorchBackend(path, device="cpu")
    weights_est = probe.profile.weight_bytes("fp32")
    per_token = probe.profile.kv_bytes_per_token("fp32")
    limit = weights_est + probe.activation_allowance_bytes(kv_bytes=260 * per_token) + 260 * per_token
    backend = TorchBackend(path, device="cpu", memory_limit_bytes=limit)
    engine = Engine(
        resolve_model(path),
        devices=[device("cpu")],
        backend_factory=lambda *_: backend,
        cost_model=CostModel(path=None),
    )
    with engine:
        engine.preload()
        caps = backend.capabilities()
        one_seq = caps.kv_budget_bytes // caps.kv_bytes_per_token
        assert 200 <= one_seq < 400
        backend.eos_ids = frozenset()
        prompt_len = len(backend.tokenizer.encode(PROMPTS[1]))
        big = {"max_new_tokens": one_seq // 2 + 10 - prompt_len}
        alone = [engine.complete(p, **big).text for p in PROMPTS[:2]]
        runner = backend._runner
        # Two big ones do not fit together; two that fit run side by side. The small ones are long enough (a
        # quarter of the budget each) that the second is admitted while the first still runs on a busy machine.
        small = {"max_new_tokens": one_seq // 4}
        for params, peak in ((big, 1), (small, 2)):
            runner.peak_batch = 0
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                replies = list(pool.map(lambda p, kw=params: engine.complete(p, **kw), PROMPTS[:2]))
            assert runner.peak_batch == peak
            if params is big:
                assert [r.text for r in replies] == alone


def raise_oom_once(backend: TorchBackend, when) -> dict:
    model = backend.model
    inner = model.forward
    state = {"raised": 0}

    def forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        if not state["raised"] and when(ids):
            state["raised"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        time.sleep(0.002)
        return inner(*args, **kwargs)

    model.forward = forward
    return state


def test_oom_in_prefill_fails_only_that_request(make_backend):
    backend = make_backend("llama")
    expected = ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=GREEDY))))
    state = raise_oom_once(backend, lambda ids: ids.shape[1] > 1)
    failed = collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=GREEDY)))
    assert state["raised"] == 1
    assert failed[-1].finish_reason == "error"
    assert "out of memory" in failed[-1].error and "max_new_tokens" in failed[-1].error
    assert backend.health().healthy
    assert ids_of(collect(backend.generate(GenerationRequest(prompt=PROMPTS[1], sampling=GREEDY)))) == expected


def test_oom_in_batched_decode_fails_newest_and_keeps_the_rest(make_backend):
    backend = make_backend("llama")
    backend.eos_ids = frozenset()
    params = SamplingParams(max_new_tokens=40)
    alone = [ids_of(collect(backend.generate(GenerationRequest(prompt=p, sampling=params)))) for p in PROMPTS[:3]]
    state = raise_oom_once(backend, lambda ids: ids.shape == (3, 1))
    results = run_concurrently(
        backend, [GenerationRequest(prompt=p, sampling=params, request_id=f"o{i}") for i, p in enumerate(PROMPTS[:3])]
    )
    assert state["raised"] == 1
    reasons = [c[-1].finish_reason for c in results]
    assert reasons.count("error") == 1
    for chunks, ref in zip(results, alone, strict=True):
        if chunks[-1].finish_reason == "error":
            assert "out of memory" in chunks[-1].error
            assert ids_of(chunks) == ref[: len(ids_of(chunks))]
        else:
            assert ids_of(chunks) == ref  # survivors are exact despite the rolled-back step
    assert backend.health().healthy
    assert backend.health().active_requests == 0


def test_capabilities_report_what_really_runs(tiny_model_factory):
    path = tiny_model_factory("llama")
    cpu = TorchBackend(path, device="cpu").capabilities()
    assert (cpu.name, cpu.device, cpu.provider, cpu.precision, cpu.simulated) == ("torch", "cpu", "cpu", "fp32", False)
    sim = TorchBackend(path, device="cpu", simulated_device="gpu", dtype="bf16").capabilities()
    assert (sim.device, sim.provider, sim.simulated, sim.precision) == ("gpu", "cpu", True, "bf16")
    auto = TorchBackend(path).capabilities()
    if torch.cuda.is_available():
        assert auto.provider.startswith("cuda:") and auto.device == "gpu" and not auto.simulated
    else:
        assert auto.provider == "cpu" and auto.device == "cpu"
    assert cpu.context_length == 256 and cpu.max_batch_size == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(BackendError, match=r"torch.cuda.is_available\(\) is False.*device='cpu'"):
        resolve_device("cuda:0")


def test_bf16_on_cpu_generates(make_backend):
    backend = make_backend("llama", dtype="bf16")
    assert backend.model.dtype == torch.bfloat16
    chunks = collect(backend.generate(GenerationRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=5))))
    assert chunks[-1].finish_reason in ("length", "stop") and ids_of(chunks)


def test_unload_ends_open_streams(make_backend):
    backend = make_backend("llama")
    backend.eos_ids = frozenset()
    slow_down(backend)
    stream = backend.generate(GenerationRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=200)))
    next(stream)
    backend.unload()
    rest = list(stream)
    assert rest[-1].finish_reason == "error" and "unloaded" in rest[-1].error
    assert not backend.health().healthy


@pytest.mark.slow
def test_default_model_answers_paris():
    from plugin.models.resolve import resolve_model

    backend = TorchBackend(resolve_model("default").path, device="auto")
    backend.load()
    try:
        request = GenerationRequest(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            sampling=SamplingParams(max_new_tokens=24),
        )
        chunks = collect(backend.generate(request))
        assert "Paris" in text_of(chunks)
        assert chunks[-1].finish_reason in ("stop", "length")
    finally:
        backend.unload()
