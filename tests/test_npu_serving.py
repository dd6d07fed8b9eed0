"""Serving on the NPU path: an HTP package on Qualcomm's QNN HTP (emulated on x86-64), through the backend,
the scheduler and the engine, labelled emulated everywhere and never simulated."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn==2.7.0)")

from backends import qnn_ep
from backends.base import ContextOverflowError, GenerationRequest, SamplingParams
from backends.ort_genai.backend import OrtGenaiBackend
from plugin.convert import export
from plugin.engine.costmodel import CostModel
from plugin.engine.devices import discover_cpu, discover_qnn_emulator
from plugin.engine.engine import Engine
from plugin.engine.explain import placement_dict, placement_headers, placement_text
from plugin.models.resolve import resolve_model

pytestmark = pytest.mark.skipif(not qnn_ep.is_emulated(), reason="these tests expect the x86-64 HTP emulator")

WINDOW, CONTEXT = 16, 64
MESSAGES = [{"role": "user", "content": "Hello, how are you today? What is the capital of France?"}]


@pytest.fixture(scope="module")
def htp_package(tiny_llama, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("npu-home")
    exported = export(
        tiny_llama, target="npu", precision="int8", home=home, progress=False, context_length=CONTEXT, window=WINDOW
    )
    return exported.path


@pytest.fixture(scope="module")
def htp(htp_package):
    backend = OrtGenaiBackend(htp_package, device="npu")
    backend.load()
    yield backend
    backend.unload()


def raw_greedy(folder: Path, ids: list[int], new_tokens: int) -> list[int]:
    """The same package through a bare onnxruntime-genai generator: what the backend must reproduce."""
    import onnxruntime_genai as og

    qnn_ep.register()
    model = og.Model(og.Config(str(folder)))
    span = -(-len(ids) // WINDOW) * WINDOW
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=span + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def test_backend_reports_the_qnn_provider_that_ran_and_says_emulated(htp):
    caps = htp.capabilities()
    assert caps.provider == "QNNExecutionProvider" and caps.device == "npu"
    assert caps.emulated and not caps.simulated
    assert caps.context_length == CONTEXT and htp.load_attempts == []


def test_streamed_tokens_equal_a_bare_generator_with_chunked_prefill(htp, htp_package):
    request = GenerationRequest(messages=MESSAGES, sampling=SamplingParams(max_new_tokens=12))
    ids = htp.encode(request)
    assert len(ids) > WINDOW  # the prompt spans several prefill windows
    chunks = list(htp.generate(request))
    tokens = [t for c in chunks for t in c.token_ids]
    expected = raw_greedy(htp_package, ids, 12)
    assert (tokens == expected[: len(tokens)] and len(tokens) == len(expected)) or chunks[-1].finish_reason == "stop"
    assert chunks[-1].prompt_tokens == len(ids)  # real prompt tokens, not the window padding


def test_stop_strings_cancel_and_context_overflow_on_htp(htp):
    greedy = GenerationRequest(prompt="Hello, how are you today?", sampling=SamplingParams(max_new_tokens=8))
    full = "".join(c.text for c in htp.generate(greedy))
    stop = next((full[i : i + 2] for i in range(1, len(full) - 1) if full[i : i + 2].strip()), None)
    if stop is not None:
        cut = GenerationRequest(prompt=greedy.prompt, sampling=SamplingParams(max_new_tokens=8, stop=(stop,)))
        chunks = list(htp.generate(cut))
        assert chunks[-1].finish_reason == "stop" and "".join(c.text for c in chunks) == full[: full.index(stop)]

    long = GenerationRequest(prompt="Hello, how are you today?", sampling=SamplingParams(max_new_tokens=40))
    stream = htp.generate(long)
    next(stream)
    canceller = threading.Thread(target=htp.cancel, args=(long.request_id,))
    canceller.start()
    canceller.join()
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled" and sum(len(c.token_ids) for c in rest) <= 1

    with pytest.raises(ContextOverflowError, match=rf"padded to \d+ for the {WINDOW}-token prefill window"):
        htp.generate(GenerationRequest(prompt="Hello, how are you today?", sampling=SamplingParams(max_new_tokens=60)))


def test_concurrent_streams_on_one_htp_package_equal_sequential_ones(htp):
    """Each request has its own generator (own KV buffers) over the one compiled model."""
    prompts = ["Hello, how are you today?", "The capital of Germany is", "def main():", "Numbers: 0 1 2 3"]

    def tokens(prompt: str) -> list[int]:
        request = GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=8))
        return [t for c in htp.generate(request) for t in c.token_ids]

    alone = [tokens(p) for p in prompts]
    together: list[list[int] | None] = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, tokens(prompts[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_engine_auto_stays_on_the_cpu_and_pinned_npu_runs_emulated_htp(tiny_llama, accelserve_home):
    import onnxruntime_genai as og

    npus = discover_qnn_emulator(qnn_ep, og)
    assert len(npus) == 1 and npus[0].emulated
    engine = Engine(resolve_model(tiny_llama), devices=[discover_cpu(), *npus], cost_model=CostModel(path=None))
    with engine:
        assert engine.predict(GenerationRequest(messages=MESSAGES)).device_id == "cpu:0"
        reply = engine.chat(MESSAGES, policy="npu", max_new_tokens=4)
    p = reply.placement
    assert (p.device, p.device_id, p.provider) == ("npu", "npu:0", "QNNExecutionProvider")
    assert p.emulated and not p.simulated and "is emulated" in p.reason
    assert placement_dict(p)["emulated"] is True
    assert placement_headers(p, reply.request_id)["x-accelserve-emulated"] == "true"
    assert "NPU (emulated on the CPU)" in placement_text(p, reply.metrics)
    assert reply.metrics.new_tokens >= 1


@pytest.mark.slow
def test_default_model_answers_paris_on_emulated_htp_through_the_cli(capsys):
    """`accelserve generate default --device npu`: the HTP package of the default model (w4a16, built or taken
    from the export cache), served on the emulated HTP and labelled so."""
    import json

    from plugin.serve.cli import main

    question = "What is the capital of France?"
    code = main(
        ["-q", "generate", "default", "--device", "npu", "--prompt", question, "--max-new-tokens", "12", "--json"]
    )
    assert code == 0
    reply = json.loads(capsys.readouterr().out)
    placement = reply["placement"]
    assert placement["device"] == "npu" and placement["provider"] == "QNNExecutionProvider"
    assert placement["emulated"] is True and placement["simulated"] is False
    assert "Paris" in reply["text"], reply["text"]


def test_an_htp_package_never_loads_under_another_providers_name(htp_package):
    """Asked for the CPU (a simulated NPU), an HTP package refuses rather than run QNN labelled as the CPU."""
    from backends.base import BackendError

    simulated = OrtGenaiBackend(htp_package, device="npu", simulated=True)
    with pytest.raises(BackendError, match="runs on the QNN provider only"):
        simulated.load()
    assert "compiled for Qualcomm's HTP" in simulated.load_attempts[0][1]
