"""OrtGenaiBackend on a tiny exported model: provider choice and fallback, parity with torch, streaming, concurrency."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from backends.base import (
    Backend,
    BackendError,
    ContextOverflowError,
    GenerationRequest,
    SamplingParams,
)
from backends.ort_genai.backend import OrtGenaiBackend
from backends.ort_genai.providers import PROVIDERS, preference_for, resolve_provider, session_threads

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "The capital of France is",
    "Hello, how are you today?",
    "def main():\n    return",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: !?.,;:'\"()[]{}",
]


@pytest.fixture(scope="session")
def tiny_export(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama checkpoint exported for onnxruntime-genai (fp32, CPU) by the project's exporter."""
    from plugin.convert import export

    home = tmp_path_factory.mktemp("ort-home")
    return export(str(tiny_llama), target="cpu", precision="fp32", home=home, progress=False).path


@pytest.fixture(scope="module")
def backend(tiny_export: Path) -> OrtGenaiBackend:
    b = OrtGenaiBackend(tiny_export, device="cpu", max_batch_size=4)
    b.load()
    yield b
    b.unload()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def run(backend: OrtGenaiBackend, request: GenerationRequest) -> tuple[str, list[int], list]:
    chunks = list(backend.generate(request))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks


def greedy(text: str, n: int = 24, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=text, sampling=SamplingParams(max_new_tokens=n, **kw))


# ---- provider choice ---------------------------------------------------------------------------------------


def test_cpu_backend_reports_what_runs(backend: OrtGenaiBackend, tiny_llama: Path) -> None:
    import json

    caps = backend.capabilities()
    assert isinstance(backend, Backend)
    assert backend.provider == "CPUExecutionProvider"
    assert (caps.name, caps.device, caps.provider, caps.precision) == (
        "onnxruntime-genai",
        "cpu",
        "CPUExecutionProvider",
        "fp32",
    )
    assert caps.context_length == json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    assert caps.max_batch_size == 4 and not caps.simulated
    assert backend.load_attempts == []
    assert backend.health().healthy


def test_npu_request_on_cpu_only_machine_reports_cpu_and_why(tiny_export: Path) -> None:
    b = OrtGenaiBackend(tiny_export, device="npu")
    b.load()
    if b.provider != "CPUExecutionProvider":
        pytest.skip(f"this machine has a real accelerator provider: {b.provider}")
    caps = b.capabilities()
    assert caps.device == "cpu" and caps.provider == "CPUExecutionProvider" and not caps.simulated
    tried = [p for p, _ in b.load_attempts]
    assert tried == [s.ort_name for s in preference_for("npu")][:-1]  # every NPU-capable provider, then CPU ran
    assert all(reason for _, reason in b.load_attempts)


def test_simulated_npu_says_so(tiny_export: Path) -> None:
    b = OrtGenaiBackend(tiny_export, device="npu", simulated=True)
    b.load()
    caps = b.capabilities()
    assert (caps.device, caps.provider, caps.simulated) == ("npu", "CPUExecutionProvider", True)


def test_forced_failing_provider_falls_back_to_cpu(tiny_export: Path) -> None:
    b = OrtGenaiBackend(tiny_export, device="gpu", providers=["cuda", "cpu"])
    b.load()
    assert b.provider == "CPUExecutionProvider"
    assert [p for p, _ in b.load_attempts] == ["CUDAExecutionProvider"]
    assert b.load_attempts[0][1].startswith("load failed")
    assert b.capabilities().device == "cpu"  # a GPU placement that fell back to CPU must not say GPU
    _, ids, _ = run(b, greedy(PROMPTS[0], 4))
    assert len(ids) == 4


def test_default_npu_order_tries_each_provider_for_real(tiny_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With detection bypassed, the NPU providers are really tried in preference order until one loads.

    Which one loads depends on the machine (with onnxruntime-qnn installed, QNN takes this CPU graph with
    CPU fallback for its nodes; that is why real placements consult the export's manifest first)."""
    import backends.ort_genai.providers as providers

    monkeypatch.setattr(providers, "unavailable_reason", lambda spec: None)
    monkeypatch.setattr(providers, "export_support", lambda folder: {})
    b = OrtGenaiBackend(tiny_export, device="npu")
    b.load()
    order = [spec.ort_name for spec in preference_for("npu")]
    tried = [p for p, _ in b.load_attempts]
    assert order[: len(tried) + 1] == [*tried, b.provider]
    assert all(reason.startswith("load failed") for _, reason in b.load_attempts)


def test_providers_the_export_cannot_run_on_are_skipped_with_its_reason(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import backends.ort_genai.providers as providers

    monkeypatch.setattr(providers, "unavailable_reason", lambda spec: None)  # as if every provider were installed
    manifest = json.loads((tiny_export / "manifest.json").read_text())["providers"]
    b = OrtGenaiBackend(tiny_export, device="npu")
    b.load()
    attempts = dict(b.load_attempts)
    assert not manifest["qnn"]["loads"]
    assert attempts["QNNExecutionProvider"] == f"skipped: the export cannot run there ({manifest['qnn']['reason']})"
    assert attempts["DmlExecutionProvider"].startswith("load failed")  # the export can, this build cannot
    assert b.provider == "CPUExecutionProvider"


def test_directml_is_reported_as_gpu() -> None:
    assert PROVIDERS["dml"].runs_on == "gpu"
    assert {k for k, s in PROVIDERS.items() if s.runs_on == "npu"} == {"qnn", "openvino", "vitisai"}


def test_no_provider_loads_is_a_clear_error(tiny_export: Path) -> None:
    b = OrtGenaiBackend(tiny_export, device="gpu", providers=["cuda"])
    with pytest.raises(BackendError, match=r"CUDAExecutionProvider.*Fix: include 'cpu'"):
        b.load()
    assert [p for p, _ in b.load_attempts] == ["CUDAExecutionProvider"]
    assert not b.health().healthy


def test_provider_names_and_bad_arguments(tiny_export: Path) -> None:
    assert resolve_provider("QNNExecutionProvider") is PROVIDERS["qnn"]
    assert resolve_provider("OpenVINO").options == {"device_type": "NPU"}
    assert [s.key for s in preference_for("gpu")] == ["cuda", "dml", "cpu"]
    with pytest.raises(ValueError, match="Unknown execution provider 'tpu'"):
        OrtGenaiBackend(tiny_export, providers=["tpu"])
    with pytest.raises(ValueError, match="device must be"):
        OrtGenaiBackend(tiny_export, device="fpga")
    with pytest.raises(ValueError, match="max_batch_size"):
        OrtGenaiBackend(tiny_export, max_batch_size=0)
    with pytest.raises(BackendError, match="not an onnxruntime-genai export"):
        OrtGenaiBackend(tiny_export.parent, device="cpu").load()
    with pytest.raises(BackendError, match="call load"):
        OrtGenaiBackend(tiny_export, device="cpu").generate(greedy("hi"))


# ---- generation --------------------------------------------------------------------------------------------


def test_chat_template_matches_transformers(backend: OrtGenaiBackend, hf_tokenizer) -> None:
    expected = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert backend.encode(GenerationRequest(messages=MESSAGES)) == list(expected)


def test_greedy_equals_torch_generate(backend: OrtGenaiBackend, tiny_llama: Path, hf_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for request in (
        GenerationRequest(messages=MESSAGES, sampling=SamplingParams(max_new_tokens=24)),
        greedy(PROMPTS[1]),
    ):
        prompt_ids = backend.encode(request)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)
        expected = out[0, len(prompt_ids) :].tolist()
        if expected and expected[-1] == hf_tokenizer.eos_token_id:
            expected = expected[:-1]
        _, ids, chunks = run(backend, request)
        assert ids == expected
        assert chunks[-1].finish_reason == ("length" if len(ids) == 24 else "stop")


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "phi3", "gpt2"])
def test_greedy_equals_torch_for_other_architectures(
    arch: str, tiny_model_factory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from plugin.convert import export

    source = tiny_model_factory(arch)
    folder = export(str(source), target="cpu", precision="fp32", home=tmp_path_factory.mktemp("home"), progress=False)
    b = OrtGenaiBackend(folder.path, device="cpu")
    b.load()
    request = GenerationRequest(messages=MESSAGES, sampling=SamplingParams(max_new_tokens=16))
    prompt_ids = b.encode(request)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)[0, len(prompt_ids) :]
    ids = run(b, request)[1]
    assert ids == [t for t in expected.tolist() if t != model.generation_config.eos_token_id][: len(ids)]
    assert len(ids) == 16 or run(b, request)[2][-1].finish_reason == "stop"


def test_streamed_text_equals_full_decode(backend: OrtGenaiBackend, hf_tokenizer) -> None:
    for i, prompt in enumerate(PROMPTS):
        request = GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=32, temperature=1.0, seed=i))
        text, ids, chunks = run(backend, request)
        assert len(ids) > 0
        assert text == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert all(c.prompt_tokens == len(backend.encode(request)) for c in chunks)
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_seed_reproducible_and_seeds_differ(backend: OrtGenaiBackend) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        return run(backend, GenerationRequest(prompt=PROMPTS[0], sampling=params))[1]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != run(backend, greedy(PROMPTS[0]))[1]


def test_stop_string_cuts_output(backend: OrtGenaiBackend) -> None:
    params = dict(max_new_tokens=40, temperature=1.0, seed=3)
    full, _, _ = run(backend, GenerationRequest(prompt=PROMPTS[2], sampling=SamplingParams(**params)))
    stop = next(
        full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    expected = full[: full.index(stop)]
    text, _, chunks = run(
        backend, GenerationRequest(prompt=PROMPTS[2], sampling=SamplingParams(stop=(stop,), **params))
    )
    assert text == expected
    assert chunks[-1].finish_reason == "stop"


def test_eos_stops_with_stop_and_is_not_emitted(backend: OrtGenaiBackend, tiny_export: Path, tmp_path: Path) -> None:
    """Make the 3rd greedy token of a prompt the model's eos (in a copy of the export): the stream must end there."""
    import json
    import shutil

    _, ids, _ = run(backend, greedy(PROMPTS[2]))
    eos_at = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    folder = shutil.copytree(tiny_export, tmp_path / "eos-variant")
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = ids[eos_at]
    (folder / "genai_config.json").write_text(json.dumps(config))
    b = OrtGenaiBackend(folder, device="cpu")
    b.load()
    text, got, chunks = run(b, greedy(PROMPTS[2]))
    assert got == ids[: eos_at + 1]  # the EOS token is counted (as on every backend) but adds no text
    assert chunks[-1].finish_reason == "stop"
    assert text == run(backend, greedy(PROMPTS[2], eos_at))[0]


def test_max_new_tokens_gives_length(backend: OrtGenaiBackend) -> None:
    _, ids, chunks = run(backend, greedy(PROMPTS[3], 5, repetition_penalty=1.2))
    assert len(ids) <= 5 and chunks[-1].finish_reason in ("length", "stop")
    if len(ids) == 5:
        assert chunks[-1].finish_reason == "length"


def test_cancel_stops_within_one_token(backend: OrtGenaiBackend) -> None:
    request = greedy(PROMPTS[0], 200)
    stream = backend.generate(request)
    first = [next(stream) for _ in range(3)]
    assert all(c.token_ids for c in first)
    assert backend.cancel(request.request_id)
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert sum(len(c.token_ids) for c in rest) <= 1
    assert not backend.cancel(request.request_id)  # finished requests are forgotten
    assert backend.health().active_requests == 0


def test_cancel_from_another_thread(tiny_export: Path) -> None:
    b = OrtGenaiBackend(tiny_export, device="cpu")
    b.load()
    running = greedy(PROMPTS[0], 200)
    stream = b.generate(running)
    next(stream)
    canceller = threading.Thread(target=b.cancel, args=(running.request_id,))
    canceller.start()
    canceller.join()
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled" and sum(len(c.token_ids) for c in rest) <= 1
    assert b.cancel(running.request_id) is False  # it is no longer running


def test_four_concurrent_streams_get_their_own_text(backend: OrtGenaiBackend) -> None:
    expected = [run(backend, greedy(p))[:2] for p in PROMPTS]
    barrier = threading.Barrier(len(PROMPTS), timeout=30)
    results: list[tuple[str, list[int]] | None] = [None] * len(PROMPTS)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            stream = backend.generate(greedy(PROMPTS[i]))
            chunks = [next(stream)]
            barrier.wait()  # all four are mid-generation on one model at this point
            chunks += list(stream)
            results[i] = ("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert results == expected
    assert len({tuple(ids) for _, ids in expected}) > 1  # the prompts really lead to different outputs


@pytest.mark.parametrize("kind", ["byte-level", "windowed"])
def test_detokenizer_streams_exactly_what_transformers_decodes(tiny_export: Path, hf_tokenizer, kind: str) -> None:
    import random

    from backends.detok import Detokenizer

    detok = Detokenizer(tiny_export / "tokenizer.json")
    assert detok.kind == "byte-level"
    if kind == "windowed":
        detok._table = None  # the path for non-byte-level tokenizers
    text = "Héllo wörld, 東京 🙂 naïve café"
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    stream = detok.stream([])
    pieces = [stream.add(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # a multi-byte character is never emitted in halves
    rng = random.Random(0)
    for _ in range(20):  # arbitrary ids: specials, invalid and truncated UTF-8
        ids = [rng.randrange(len(hf_tokenizer)) for _ in range(rng.randrange(1, 30))]
        stream = detok.stream([1, 2])
        streamed = "".join(stream.add(t) for t in ids) + stream.flush()
        assert streamed == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_model_without_chat_template_is_refused_alike_on_every_path(
    tmp_path: Path, tiny_export: Path, tiny_llama
) -> None:
    """One chat-template implementation: no template means the same refusal from both backends and the engine."""
    import json
    import shutil

    from backends.prompt import NoChatTemplateError
    from backends.torch.backend import TorchBackend
    from plugin.engine.costmodel import CostModel
    from plugin.engine.engine import Engine
    from plugin.models.resolve import resolve_model

    def strip_template(folder: Path) -> Path:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        return folder

    export_copy = strip_template(shutil.copytree(tiny_export, tmp_path / "export"))
    model_copy = strip_template(shutil.copytree(tiny_llama, tmp_path / "model"))
    ort, torch_backend = OrtGenaiBackend(export_copy, device="cpu"), TorchBackend(model_copy, device="cpu")
    messages = {}
    for backend in (ort, torch_backend):
        backend.load()
        with pytest.raises(NoChatTemplateError, match=r"has no chat template.*send a raw `prompt`") as err:
            backend.generate(GenerationRequest(messages=MESSAGES))
        messages[type(backend).__name__] = str(err.value).split(" has no chat template")[1]
        assert list(backend.generate(GenerationRequest(prompt="hello", sampling=SamplingParams(max_new_tokens=2))))
        backend.unload()
    assert messages["OrtGenaiBackend"] == messages["TorchBackend"]
    engine = Engine(resolve_model(model_copy), cost_model=CostModel(path=None))
    with engine, pytest.raises(NoChatTemplateError, match="has no chat template"):
        engine.chat(MESSAGES)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_context_overflow_raises_before_any_work(backend: OrtGenaiBackend) -> None:
    context = backend.capabilities().context_length
    with pytest.raises(ContextOverflowError, match=r"exceeds the model's context length 256"):
        backend.generate(greedy(PROMPTS[0], context))
    assert backend.health().active_requests == 0
    n_prompt = len(backend.encode(greedy(PROMPTS[0])))
    _, ids, _ = run(backend, greedy(PROMPTS[0], context - n_prompt, repetition_penalty=1.5))
    assert 0 < len(ids) <= context - n_prompt


def test_invalid_sampling_values_are_clear(backend: OrtGenaiBackend) -> None:
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 2147483647"):
        SamplingParams(seed=2**31)  # what onnxruntime-genai cannot take is a bad request, not a device failure
    assert SamplingParams(seed=2**31 - 1).seed == 2**31 - 1
    with pytest.raises(ValueError, match="must be a dict with 'role' and 'content'"):
        GenerationRequest(messages=[{"role": "user"}])
    with pytest.raises(ValueError, match="encodes to no tokens"):
        backend.generate(GenerationRequest(prompt=""))


def test_duplicate_request_id_is_rejected(backend: OrtGenaiBackend) -> None:
    request = greedy(PROMPTS[0], 50)
    stream = backend.generate(request)
    next(stream)
    with pytest.raises(ValueError, match="already generating"):
        backend.generate(request)
    assert backend.cancel(request.request_id)
    list(stream)


# ---- the real default model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_paris(tmp_path: Path) -> None:
    from plugin.convert import export

    exported = export("default", target="cpu", precision="int4", progress=False)  # what a simulated NPU gets
    b = OrtGenaiBackend(exported.path, device="npu", simulated=True)
    b.load()
    caps = b.capabilities()
    assert (caps.device, caps.provider, caps.precision) == ("npu", "CPUExecutionProvider", "int4")
    text, _, chunks = run(b, GenerationRequest(messages=MESSAGES, sampling=SamplingParams(max_new_tokens=32)))
    assert "Paris" in text
    assert chunks[-1].finish_reason == "stop"


def test_cpu_provider_gets_one_thread_per_physical_core_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 6 if not logical else 12)
    assert session_threads(PROVIDERS["cpu"], None) == {"intra_op_num_threads": 6, "inter_op_num_threads": 1}
    assert session_threads(PROVIDERS["cpu"], 1) == {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
    assert session_threads(PROVIDERS["qnn"], None) == {}  # accelerators keep onnxruntime-genai's default
    assert session_threads(PROVIDERS["qnn"], 3)["intra_op_num_threads"] == 3
