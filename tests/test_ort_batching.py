"""Continuous batching on the onnxruntime-genai CPU path (backends/ort_genai/batching.py), on tiny exports.

The scheduler thread is held at its first forward until every request of a test is submitted, so requests
really share decode steps (checked through `peak_batch`), and joins and cancels happen at chosen steps.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from backends.base import BackendError, GenerationRequest, SamplingParams
from backends.ort_genai import batching
from backends.ort_genai.backend import OrtGenaiBackend
from backends.ort_genai.providers import PROVIDERS

PROMPTS = [
    "The capital of France is",
    "Hello, how are you today? I am fine, thank you very much. And you?",
    "def main():\n    return",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: !?.,;:'\"()[]{}",
    "Hi",
]


@pytest.fixture(scope="module")
def exports(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """arch -> the tiny checkpoint's fp32 CPU export (the fused builder graph), built once per module."""
    from plugin.convert import export

    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            home = tmp_path_factory.mktemp(f"home-{arch}")
            built[arch] = export(str(tiny_model_factory(arch)), target="cpu", precision="fp32", home=home).path
        return built[arch]

    return make


def load(folder: Path, **kw) -> OrtGenaiBackend:
    b = OrtGenaiBackend(folder, device="cpu", **kw)
    b.load()
    return b


def request(prompt: str, n: int = 24, rid: str | None = None, **kw) -> GenerationRequest:
    extra = {"request_id": rid} if rid else {}
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=n, **kw), **extra)


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


class Gate:
    """Holds the scheduler thread before its first forward; calls hooks before chosen forwards (by count)."""

    def __init__(self, backend: OrtGenaiBackend, hooks: dict[int, Callable[[], None]] | None = None) -> None:
        runner = backend._runner
        assert runner is not None, backend.batching_reason
        self.runner = runner
        self.opened = threading.Event()
        self.hooks = hooks or {}
        self.calls = 0
        forward = runner._forward

        def gated(*args):
            self.opened.wait(timeout=30)
            self.calls += 1
            hook = self.hooks.get(self.calls)
            if hook is not None:
                hook()
            return forward(*args)

        runner._forward = gated  # type: ignore[method-assign]

    def open(self) -> None:
        self.opened.set()


def run_together(backend: OrtGenaiBackend, requests: list[GenerationRequest], peak: int | None = None) -> list[list]:
    """Submit every request while the scheduler is held, then read all streams: they share decode steps."""
    gate = Gate(backend)
    streams = [backend.generate(r) for r in requests]
    gate.open()
    out = [list(s) for s in streams]
    assert gate.runner.peak_batch == (peak or len(requests))  # they really ran in one batch
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_batched_greedy_equals_one_at_a_time(arch: str, exports) -> None:
    folder = exports(arch)
    alone = load(folder, batching=False)
    batched = load(folder)
    assert batched._runner is not None and alone._runner is None
    try:
        reqs = [request(p, 24, ignore_eos=True) for p in PROMPTS]
        assert len({len(batched.encode(r)) for r in reqs}) == len(reqs)  # prompts of different lengths
        expected = [tokens(alone.generate(r)) for r in reqs]
        got = run_together(batched, [request(p, 24, ignore_eos=True) for p in PROMPTS])
        assert [tokens(c) for c in got] == expected
        assert all(c[-1].finish_reason == "length" for c in got)
        assert len({tuple(e) for e in expected}) > 1  # the prompts really lead to different outputs
    finally:
        alone.unload()
        batched.unload()


def test_joining_and_cancelled_requests_leave_the_others_unchanged(exports) -> None:
    folder = exports("llama")
    alone = load(folder, batching=False)
    b = load(folder)
    try:
        expected = {i: tokens(alone.generate(request(PROMPTS[i], 40, ignore_eos=True))) for i in range(3)}
        late: list = []
        gate = Gate(
            b,
            {
                6: lambda: late.append(b.generate(request(PROMPTS[2], 40, ignore_eos=True))),  # joins mid-flight
                12: lambda: b.cancel("victim"),  # leaves mid-flight
            },
        )
        first = b.generate(request(PROMPTS[0], 40, ignore_eos=True))
        victim = b.generate(request(PROMPTS[1], 40, rid="victim", ignore_eos=True))
        gate.open()
        first_chunks = list(first)
        victim_chunks = list(victim)
        late_chunks = list(late[0])
        assert tokens(first_chunks) == expected[0]
        assert tokens(late_chunks) == expected[2]
        assert victim_chunks[-1].finish_reason == "cancelled"
        assert tokens(victim_chunks) == expected[1][: len(tokens(victim_chunks))] and len(tokens(victim_chunks)) < 40
        assert gate.runner.peak_batch == 3
        assert b.health().active_requests == 0 and b.health().healthy
    finally:
        alone.unload()
        b.unload()


def test_per_request_sampling_in_one_batch(exports) -> None:
    folder = exports("llama")
    b = load(folder)
    try:
        sampled = {"temperature": 1.0, "top_p": 0.95, "top_k": 50}
        alone_seed7 = tokens(b.generate(request(PROMPTS[0], 24, seed=7, **sampled)))
        greedy = tokens(b.generate(request(PROMPTS[0], 24)))
        full = "".join(c.text for c in b.generate(request(PROMPTS[2], 40, seed=3, temperature=1.0)))
        pieces = (full[i : i + 2] for i in range(3, len(full) - 2))
        stop = next(p for p in pieces if p.strip() and "\ufffd" not in p)
        got = run_together(
            b,
            [
                request(PROMPTS[0], 24, seed=7, **sampled),
                request(PROMPTS[0], 24, seed=8, **sampled),
                request(PROMPTS[0], 24),
                request(PROMPTS[0], 24, seed=9, temperature=1.0, top_k=1),  # top-k 1 is greedy
                request(PROMPTS[2], 40, seed=3, temperature=1.0, stop=(stop,)),
                request(PROMPTS[1], 6, ignore_eos=True),
            ],
        )
        assert tokens(got[0]) == alone_seed7  # a seed's draws do not depend on what shares the batch
        assert tokens(got[1]) != alone_seed7
        assert tokens(got[2]) == greedy and tokens(got[3]) == greedy[: len(tokens(got[3]))]
        assert "".join(c.text for c in got[4]) == full[: full.index(stop)] and got[4][-1].finish_reason == "stop"
        assert len(tokens(got[5])) == 6 and got[5][-1].finish_reason == "length"
    finally:
        b.unload()


def test_logprobs_in_a_batch_equal_alone(exports) -> None:
    folder = exports("llama")
    alone = load(folder, batching=False)
    b = load(folder)
    try:
        want = [c.logprobs[0] for c in alone.generate(request(PROMPTS[1], 8, logprobs=3)) if c.token_ids]
        got = run_together(b, [request(PROMPTS[1], 8, logprobs=3), request(PROMPTS[0], 8)])
        lps = [c.logprobs[0] for c in got[0] if c.token_ids]
        assert [lp.token_id for lp in lps] == [lp.token_id for lp in want]
        assert np.allclose([lp.logprob for lp in lps], [lp.logprob for lp in want], atol=1e-4)
        assert [[t for t, _ in lp.top] for lp in lps] == [[t for t, _ in lp.top] for lp in want]
    finally:
        alone.unload()
        b.unload()


def test_rows_leaving_in_any_order_keep_the_cache_of_the_others(exports) -> None:
    """Short and long requests interleaved: rows leave from the middle, the last row's cache moves into the hole."""
    folder = exports("qwen2")
    alone = load(folder, batching=False)
    b = load(folder, max_batch_size=8)
    try:
        lengths = [5, 30, 9, 30, 2, 17, 30, 11]
        reqs = [request(PROMPTS[i % len(PROMPTS)], n, ignore_eos=True) for i, n in enumerate(lengths)]
        expected = [tokens(alone.generate(r)) for r in reqs]
        got = run_together(b, [request(PROMPTS[i % len(PROMPTS)], n, ignore_eos=True) for i, n in enumerate(lengths)])
        assert [tokens(c) for c in got] == expected
        assert b.capabilities().max_batch_size == 8
        runner = b._runner
        assert runner is not None
        for _ in range(200):  # the cache's memory is given back once nothing runs
            if runner.kv.rows == 0:
                break
            threading.Event().wait(0.02)
        assert runner.kv.rows == 0 and runner.kv.nbytes == 0
    finally:
        alone.unload()
        b.unload()


def test_cancel_before_prefill_and_closing_the_stream(exports) -> None:
    b = load(exports("llama"))
    try:
        gate = Gate(b)
        running = b.generate(request(PROMPTS[0], 200, ignore_eos=True))
        queued = b.generate(request(PROMPTS[1], 200, rid="queued", ignore_eos=True))
        assert b.cancel("queued")
        gate.open()
        assert [c.finish_reason for c in queued] == ["cancelled"]
        first = next(running)
        assert first.token_ids
        running.close()  # the caller stops reading: its row is freed
        for _ in range(100):
            if gate.runner.active_count() == 0:
                break
            threading.Event().wait(0.02)
        assert gate.runner.active_count() == 0 and b.health().active_requests == 0
        assert not b.cancel("queued")
    finally:
        b.unload()


def test_a_failing_decode_step_fails_its_rows_and_the_runner_carries_on(exports) -> None:
    b = load(exports("llama"))
    try:
        calls = {"n": 0}
        runner = b._runner
        assert runner is not None
        forward = runner._forward

        def flaky(ids, mask, kv):
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("injected failure")
            return forward(ids, mask, kv)

        runner._forward = flaky  # type: ignore[method-assign]
        chunks = list(b.generate(request(PROMPTS[0], 20, ignore_eos=True)))
        assert chunks[-1].finish_reason == "error" and "injected failure" in (chunks[-1].error or "")
        after = list(b.generate(request(PROMPTS[0], 5, ignore_eos=True)))
        assert after[-1].finish_reason == "length" and b.health().healthy
    finally:
        b.unload()


def test_what_is_not_batched_says_why(exports, tmp_path: Path) -> None:
    folder = exports("llama")
    assert batching.batchable_graph(folder)[0] is not None
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "genai_config.json").write_text(json.dumps({"model": {"type": "decoder-pipeline"}}))
    spec, why = batching.batchable_graph(pipeline)
    assert spec is None and "one stream at a time" in why
    config = json.loads((folder / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = False
    unshared = tmp_path / "unshared"
    unshared.mkdir()
    (unshared / "genai_config.json").write_text(json.dumps(config))
    assert "share" in batching.batchable_graph(unshared)[1]
    b = load(folder, batching=False)
    try:
        assert b._runner is None and "batching=False" in b.batching_reason
        assert b.capabilities().max_batch_size == 4
    finally:
        b.unload()
    graph, why = OrtGenaiBackend(folder, device="cpu", batching=True)._batch_plan(PROVIDERS["qnn"])
    assert graph is None and "CPU provider" in why
    npu = OrtGenaiBackend(folder, device="cpu")
    npu._window = 64  # what load() reads from a static-shape (HTP) package's genai_config
    graph, why = npu._batch_plan(PROVIDERS["qnn"])
    assert graph is None and why == batching.STATIC_PIPELINE_REASON and "one stream at a time" in why
    assert npu.max_batch_size == 1  # the engine queues every further request
    with pytest.raises(BackendError, match="cannot be batched"):  # asked for, where it cannot be
        _load_unbatchable(folder, tmp_path)


def _load_unbatchable(folder: Path, tmp_path: Path) -> None:
    """batching=True on an export whose config says its KV buffer is not shared: refused at load."""
    import shutil

    copy = shutil.copytree(folder, tmp_path / "not-shared")
    config = json.loads((copy / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = False
    (copy / "genai_config.json").write_text(json.dumps(config))
    load(copy, batching=True)


# ---- token choice, row by row ------------------------------------------------------------------------------


def work(**params) -> batching.Work:
    return batching.make_work("r", [5, 6], SamplingParams(max_new_tokens=8, **params), frozenset({0}), _NoDecoder())


class _NoDecoder:
    def add(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def test_choose_respects_each_rows_settings() -> None:
    logits = np.array([9.0, 1.0, 2.0, 3.0, 4.0, 0.5, 8.0, -1.0], dtype=np.float32)
    assert batching.choose(logits, work()) == 0
    assert batching.choose(logits, work(min_tokens=2)) == 6  # EOS (0) banned before min_tokens
    assert batching.choose(logits, work(ignore_eos=True)) == 6
    penalised = work(repetition_penalty=10.0)
    penalised.prompt_ids = [0]  # the best token was already seen: a strong penalty moves the choice
    assert batching.choose(logits, penalised) == 6
    top2 = work(temperature=5.0, top_k=2, seed=1)
    assert {batching.choose(logits, top2) for _ in range(200)} == {0, 6}
    nucleus = work(temperature=1.0, top_p=0.5, seed=1)  # token 0 alone holds > half the mass
    assert {batching.choose(logits, nucleus) for _ in range(50)} == {0}
    hot = work(temperature=100.0, seed=2)
    assert len({batching.choose(logits, hot) for _ in range(400)}) == len(logits)
    assert batching.choose(np.full(8, np.nan, dtype=np.float32), work()) is None
    a, b = work(temperature=1.0, seed=4), work(temperature=1.0, seed=4)
    assert [batching.choose(logits, a) for _ in range(20)] == [batching.choose(logits, b) for _ in range(20)]


def test_the_kv_layout_comes_from_the_graph_inputs(exports) -> None:
    folder = exports("llama")
    plan, why = batching.batch_plan(folder)
    assert plan is not None and plan.kv_dtype is None, why  # config and ops only: no weights, no onnx
    spec, _ = batching.batchable_graph(folder)  # the same inputs read with onnx
    assert spec is not None and spec.kv_dtype is np.float32 and spec.kv_heads == 2 and spec.head_size == 16
    inputs = [batching.GraphInput(n, np.float32, (1, 2, "len", 16)) for pair in plan.past for n in pair]
    inputs += [batching.GraphInput(name, None, (1, "s")) for name in (plan.input_ids, plan.attention_mask)]
    assert batching.graph_spec(plan, inputs) == (spec, "")
    done, why = batching.graph_spec(plan, [*inputs, batching.GraphInput("position_ids", None, (1, "s"))])
    assert done is None and "position_ids" in why
    inputs[0] = batching.GraphInput(inputs[0].name, None, (1, 2, "len", 16))  # a bf16 / int8 cache: not bound here
    assert batching.graph_spec(plan, inputs)[1] == "an unexpected KV cache layout or type"


def test_requests_arriving_together_share_one_prefill(exports) -> None:
    """Five prompts of different lengths (one of a single token) are prefilled in one right-padded call, and
    each still gets exactly the tokens it gets alone on the same backend and on one og generator."""
    folder = exports("llama")
    alone = load(folder, batching=False)
    b = load(folder)
    try:
        runner = b._runner
        assert runner is not None
        shapes: list[tuple[int, int]] = []
        forward = runner._forward

        def recorded(ids, mask, kv):
            shapes.append(ids.shape)
            return forward(ids, mask, kv)

        runner._forward = recorded  # type: ignore[method-assign]
        reqs = [request(p, 12, ignore_eos=True) for p in PROMPTS]
        ids = [b.encode(r) for r in reqs]
        short = next(t for t in ("a", "Hi", "The", "x") if len(b.encode(request(t))) == 1)
        reqs.append(request(short, 12, ignore_eos=True))  # a one-token prompt: its first step is its prefill
        expected = [tokens(alone.generate(r)) for r in reqs]
        shapes.clear()
        got = run_together(b, reqs)
        assert [tokens(c) for c in got] == expected
        # one prefill of the five multi-token prompts (the one-token prompt has nothing to prefill), then steps
        widths = sorted(len(i) - 1 for i in ids)
        assert shapes[0] == (len(PROMPTS), widths[-1])
        assert all(s == (len(reqs), 1) for s in shapes[1:3])
    finally:
        alone.unload()
        b.unload()


def test_a_failing_shared_prefill_is_retried_and_fails_only_its_bad_prompt(exports) -> None:
    folder = exports("llama")
    b = load(folder)
    try:
        runner = b._runner
        assert runner is not None
        want = {i: tokens(b.generate(request(PROMPTS[i], 10, ignore_eos=True))) for i in range(3)}
        bad = b.encode(request(PROMPTS[1], 10))
        forward = runner._forward

        def flaky(ids, mask, kv):
            rows = [list(r[: int(m.sum())]) for r, m in zip(ids, mask, strict=True)]
            if ids.shape[1] > 1 and bad[:-1] in rows:  # any prefill holding the bad prompt fails
                raise RuntimeError("injected prefill failure")
            return forward(ids, mask, kv)

        runner._forward = flaky  # type: ignore[method-assign]
        got = run_together(b, [request(PROMPTS[i], 10, ignore_eos=True) for i in range(3)], peak=2)
        assert got[1][-1].finish_reason == "error" and "injected prefill failure" in (got[1][-1].error or "")
        assert tokens(got[0]) == want[0] and tokens(got[2]) == want[2]
        assert b.health().healthy
    finally:
        b.unload()


def test_prefill_groups_stay_within_the_token_budget() -> None:
    def work(n: int) -> batching.Work:
        return batching.Work(f"r{n}", list(range(n)), SamplingParams(), stream=None)  # type: ignore[arg-type]

    ws = [work(n) for n in (11, 21, 6, 41, 2, 1)]
    groups = batching.prefill_groups(ws, budget=60)
    assert [[len(w.prompt_ids) for w in g] for g in groups] == [[11, 21, 6], [41], [2, 1]]  # 3 x 20 fits 60
    for g in groups:  # rows x the longest prefilled width (a prompt but its last token)
        assert len(g) * max(len(w.prompt_ids) - 1 for w in g) <= 60 or len(g) == 1
    assert batching.prefill_groups([], budget=60) == []
    assert [len(g) for g in batching.prefill_groups(ws, budget=10_000)] == [6]
