"""Ollama's API, driven by the official `ollama` Python client against a real server over fake backends."""

from __future__ import annotations

import httpx
import pytest
from test_server import make_engine, running

from plugin.serve.ollama import OLLAMA_DEFAULTS, OllamaError, sampling_from_options
from plugin.serve.server import create_app

ollama = pytest.importorskip("ollama", reason="the ollama client is a dev dependency: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    from plugin.models.resolve import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELSERVE_HOME", str(tmp_path_factory.mktemp("home")))
        engine = make_engine(resolve_model(tiny_llama), {})
        try:
            with running(create_app({"tiny": engine})) as url:
                yield url
        finally:
            engine.close()


def test_chat_generate_and_streaming_through_the_official_client(server):
    client = ollama.Client(host=server)
    reply = client.chat(model="tiny", messages=[{"role": "user", "content": "hello ollama"}])
    assert reply.message.content == "echo: hello ollama" and reply.done and reply.done_reason == "stop"
    assert reply.eval_count == 4 and reply.prompt_eval_count > 0  # three words and EOS
    pieces = list(client.chat(model="tiny", messages=[{"role": "user", "content": "a b c d"}], stream=True))
    assert len(pieces) > 2 and pieces[-1].done and not any(p.done for p in pieces[:-1])
    assert "".join(p.message.content for p in pieces) == "echo: a b c d"
    generated = client.generate(model="tiny", prompt="raw text", raw=True, options={"num_predict": 2})
    assert generated.response == "echo: raw" and generated.done_reason == "length"
    streamed = "".join(p.response for p in client.generate(model="tiny", prompt="x y", stream=True))
    assert streamed == "echo: x y"


def test_tags_show_version_and_errors(server):
    client = ollama.Client(host=server)
    (model,) = client.list().models
    assert model.model == "tiny" and model.details.family == "llama"
    shown = client.show("tiny")
    assert shown.modelinfo["general.architecture"] == "llama" and "im_start" in (shown.template or "")
    assert httpx.get(f"{server}/api/version", timeout=10).json()["version"]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and "not found" in err.value.error
    bad = httpx.post(f"{server}/api/chat", json={"model": "tiny", "messages": []}, timeout=10)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]
    headers = httpx.post(
        f"{server}/api/chat",
        json={"model": "tiny", "messages": [{"role": "user", "content": "h"}], "stream": False},
        timeout=10,
    ).headers
    assert headers["x-accelserve-device"] in ("npu", "gpu", "cpu") and "x-accelserve-emulated" in headers


def test_options_follow_ollamas_meaning():
    params = sampling_from_options({"num_predict": 7, "repeat_penalty": 1.2, "stop": "END", "seed": 3})
    assert (params.max_new_tokens, params.repetition_penalty, params.stop, params.seed) == (7, 1.2, ("END",), 3)
    defaults = sampling_from_options(None)
    assert defaults.temperature == OLLAMA_DEFAULTS["temperature"] and defaults.top_k == 40
    with pytest.raises(OllamaError, match="num_predict=-2"):
        sampling_from_options({"num_predict": -2})
    with pytest.raises(OllamaError, match="temperature must be >= 0"):
        sampling_from_options({"temperature": -1})
