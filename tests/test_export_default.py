"""The real default model (SmolLM2-135M-Instruct) through export: slow, run by `make test`."""

from __future__ import annotations

import json

import pytest

from plugin.convert import export, verify_export

pytestmark = pytest.mark.slow


def _chat(folder, question: str, max_new: int = 24) -> str:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": question}]), add_generation_prompt=True)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return tok.decode(gen.get_sequence(0)[len(ids) :])


def test_default_model_fp32_and_int4(accelserve_home):
    fp32 = export("default", target="cpu", precision="fp32", progress=False)
    assert fp32.manifest["parity"]["generation_exact"] is True  # export() raises otherwise; checked for clarity
    assert "Paris" in _chat(fp32.path, "What is the capital of France?")

    int4 = export("default", target="cpu", precision="int4", progress=False)
    assert verify_export(int4.path) == []
    assert int4.manifest["total_size_bytes"] < 0.5 * fp32.manifest["total_size_bytes"]
    assert int4.manifest["parity"]["top1_agreement"] > 0.5
    again = export("default", target="cpu", precision="int4", progress=False)
    assert again.cache_hit and again.path == int4.path
