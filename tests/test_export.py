"""Export: every architecture end to end on tiny checkpoints, precision conversion, manifest, cache, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx
import pytest

import plugin.convert.optimum_step as optimum_step
from plugin.convert import SUPPORTED_ARCHITECTURES, ExportError, export, provider_options_for, verify_export
from plugin.convert.genai_config import read_graph_io
from plugin.convert.parity import PROMPTS

from tiny_models import build_tokenizer

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gpt2")


def _export(src: Path, home: Path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("graph", "plain")  # these tests check the Optimum graph; the fused one: test_export_fused.py
    return export(src, home=home, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_export_matches_torch_exactly(arch, tiny_model_factory, accelserve_home):
    exported = _export(tiny_model_factory(arch), accelserve_home, target="cpu", precision="fp32")
    parity = exported.manifest["parity"]
    assert parity["generation_match"] == [True] * len(PROMPTS)
    assert parity["top1_agreement"] == 1.0
    assert parity["max_logit_diff"] < 1e-3
    assert parity["tokenizer_match"] is True
    # genai_config is written from the graph that was exported, not assumed per architecture
    config = json.loads((exported.path / "genai_config.json").read_text())
    io = read_graph_io(exported.path / "model.onnx")
    decoder = config["model"]["decoder"]
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert (name in decoder["inputs"]) == (name in io.inputs)
    assert decoder["num_hidden_layers"] == io.num_layers
    assert decoder["num_key_value_heads"] == io.kv_heads
    assert decoder["head_size"] == io.head_dim


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_export_runs_and_writes_sane_manifest(arch, tiny_model_factory, accelserve_home):
    import onnxruntime_genai as og

    exported = _export(tiny_model_factory(arch), accelserve_home, target="cpu", precision="int4")
    m = exported.manifest
    assert m["precision"] == "int4" and m["target"] == "cpu" and m["architecture"] == arch
    assert m["quantization"]["bits"] == 4 and m["quantization"]["block_size"] == 32
    assert m["quantization"]["symmetric"] is True and m["quantization"]["quantized_matmuls"] > 0
    graph = onnx.load(str(exported.path / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) == m["quantization"]["quantized_matmuls"]
    assert 0.0 <= m["parity"]["top1_agreement"] <= 1.0 and len(m["parity"]["generation_match"]) == len(PROMPTS)
    assert set(m["timings_s"]) >= {"hash_source", "optimum_export", "quantize", "genai_config", "parity"}
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert m["files"][name]["size"] == (exported.path / name).stat().st_size
        assert len(m["files"][name]["sha256"]) == 64
    assert m["providers"]["cpu"]["loads"] is True
    assert m["providers"]["qnn"]["loads"] is False and "MatMulNBits" in m["providers"]["qnn"]["reason"]
    assert m["providers"]["OpenVINO:NPU"]["loads"] is False and m["providers"]["VitisAI"]["loads"] is False
    # the folder loads exactly as written (CPU floor) and generates
    model = og.Model(str(exported.path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=12)
    gen = og.Generator(model, params)
    gen.append_tokens(og.Tokenizer(model).encode("Hello"))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) > 1


def test_int8_uses_matmulnbits_8bit(tiny_llama, accelserve_home):
    exported = _export(tiny_llama, accelserve_home, target="cpu", precision="int8")
    q = exported.manifest["quantization"]
    assert q["bits"] == 8 and "MatMulNBits bits=8" in q["method"]
    assert exported.manifest["parity"]["top1_agreement"] > 0.8


def test_fp16_for_gpu_target(tiny_llama, accelserve_home):
    exported = _export(tiny_llama, accelserve_home, target="gpu", precision="fp16")
    io = read_graph_io(exported.path / "model.onnx")
    assert io.float_type == "float16"
    parity = exported.manifest["parity"]
    assert parity["top1_agreement"] >= 0.98 and parity["max_logit_diff"] < 0.1
    # this build has no GPU provider, so the config names the CPU floor and says so
    assert exported.manifest["config_provider"] in {"cpu", "cuda", "dml"}


def test_chat_template_and_tokenizer_read_by_onnxruntime_genai(tiny_llama, accelserve_home):
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    exported = _export(tiny_llama, accelserve_home, target="cpu", precision="int4", parity=False)
    assert exported.manifest["parity"] is None
    tok = og.Tokenizer(og.Model(str(exported.path)))
    hf = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo wörld, 東京 🙂"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True) == text
    assert list(tok.encode(text)) == hf(text, add_special_tokens=False)["input_ids"]


def test_cache_hit_and_output_copy(tiny_llama, accelserve_home, tmp_path, monkeypatch):
    first = _export(tiny_llama, accelserve_home, target="cpu", precision="int4")
    assert not first.cache_hit and first.path.parent == accelserve_home / "exports"

    def no_export(*a, **k):
        raise AssertionError("a cache hit must not export again")

    monkeypatch.setattr(optimum_step, "optimum_export", no_export)
    again = _export(tiny_llama, accelserve_home, target="cpu", precision="int4")
    assert again.cache_hit and again.path == first.path and again.key == first.key
    out = tmp_path / "my-export"
    copied = _export(tiny_llama, accelserve_home, target="cpu", precision="int4", output=out)
    assert copied.cache_hit and copied.path == out.resolve() and verify_export(out) == []
    assert json.loads((out / "manifest.json").read_text())["key"] == first.key
    # other options are other keys
    monkeypatch.undo()
    other = _export(tiny_llama, accelserve_home, target="cpu", precision="int4", block_size=64, parity=False)
    assert other.key != first.key


def test_damaged_cache_folder_is_rebuilt(tiny_llama, accelserve_home, caplog):
    first = _export(tiny_llama, accelserve_home, target="cpu", precision="fp32", parity=False)
    data = first.path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])  # truncated weights
    with caplog.at_level(logging.WARNING, logger="plugin.convert"):
        rebuilt = _export(tiny_llama, accelserve_home, target="cpu", precision="fp32", parity=False)
    assert not rebuilt.cache_hit and verify_export(rebuilt.path) == []
    assert any("damaged" in r.message and "model.onnx.data" in r.message for r in caplog.records)
    # an edited config is caught too
    cfg = rebuilt.path / "genai_config.json"
    cfg.write_text(cfg.read_text().replace('"max_length"', '"max_length_edited"'))
    assert any("genai_config.json" in p for p in verify_export(rebuilt.path))
    assert not _export(tiny_llama, accelserve_home, target="cpu", precision="fp32", parity=False).cache_hit


def test_damaged_output_folder_is_reported(tiny_llama, accelserve_home, tmp_path):
    out = tmp_path / "out"
    _export(tiny_llama, accelserve_home, target="cpu", precision="fp32", parity=False, output=out)
    (out / "model.onnx.data").unlink()
    with pytest.raises(ExportError, match=r"does not match its manifest: model.onnx.data is missing"):
        _export(tiny_llama, accelserve_home, target="cpu", precision="fp32", parity=False, output=out)
    fixed = _export(tiny_llama, accelserve_home, target="cpu", precision="fp32", parity=False, output=out, force=True)
    assert verify_export(fixed.path) == []


def test_output_refuses_foreign_folder(tiny_llama, accelserve_home, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    with pytest.raises(ExportError, match="holds no accelserve export"):
        _export(tiny_llama, accelserve_home, target="cpu", precision="fp32", parity=False, output=out)
    assert (out / "thesis.txt").read_text() == "precious"


def test_failed_export_leaves_nothing_finished(tiny_llama, accelserve_home, monkeypatch):
    import plugin.convert.quantize as quantize

    def boom(*a, **k):
        raise RuntimeError("killed mid-quantization")

    monkeypatch.setattr(quantize, "convert_precision", boom)
    with pytest.raises(RuntimeError, match="killed"):
        _export(tiny_llama, accelserve_home, target="cpu", precision="int4")
    exports = accelserve_home / "exports"
    assert [p.name for p in exports.iterdir() if not p.name.startswith(".")] == []
    assert list(exports.rglob("manifest.json")) == []
    assert list(exports.glob(".*.partial-*")) == []
    monkeypatch.undo()
    ok = _export(tiny_llama, accelserve_home, target="cpu", precision="int4", parity=False)
    assert not ok.cache_hit and verify_export(ok.path) == []


def test_unsupported_architecture_fails_before_any_work(tmp_path, accelserve_home, monkeypatch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "tiny-mixtral"  # a transformers causal LM Optimum does not export (mixture of experts)
    tok = build_tokenizer(folder)
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)

    def no_work(*a, **k):
        raise AssertionError("no export work may start for an unsupported architecture")

    monkeypatch.setattr(optimum_step, "optimum_export", no_work)
    with pytest.raises(ExportError) as err:
        _export(folder, accelserve_home)
    message = str(err.value)
    assert "'mixtral'" in message and "Optimum" in message and "mixtral" not in SUPPORTED_ARCHITECTURES
    assert not (accelserve_home / "exports").exists() or not any((accelserve_home / "exports").iterdir())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "tpu"}, "unknown target 'tpu'"),
        ({"precision": "int3"}, "unknown precision 'int3'"),
        ({"target": "npu", "precision": "fp16"}, "not built for target 'npu'"),
        ({"block_size": 24}, "block_size must be a power of two"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match, tiny_llama, accelserve_home):
    with pytest.raises(ExportError, match=match):
        _export(tiny_llama, accelserve_home, **kwargs)


def test_provider_options_per_target():
    assert provider_options_for("cpu") == []
    assert provider_options_for("npu") == []  # CPU floor; the backend picks a present NPU at load time
    assert provider_options_for("gpu", "cuda") == [{"cuda": {"enable_cuda_graph": "0"}}]
    assert provider_options_for("gpu", "DirectML", "fp16") == [{"dml": {}}]
    assert provider_options_for("cpu", "openvino") == [{"OpenVINO": {"device_type": "CPU"}}]
    with pytest.raises(ExportError, match="QNN HTP runs static-shape QDQ"):
        provider_options_for("npu", "qnn")
    with pytest.raises(ExportError, match="NPU device compiles static shapes"):
        provider_options_for("npu", "OpenVINO")
    with pytest.raises(ExportError, match="not in the public onnxruntime-genai wheels"):
        provider_options_for("npu", "VitisAI")
    with pytest.raises(ExportError, match="no 8-bit MatMulNBits"):
        provider_options_for("gpu", "dml", "int8")
    with pytest.raises(ExportError, match="does not serve target 'cpu'"):
        provider_options_for("cpu", "cuda")
    with pytest.raises(ExportError, match="unknown execution provider"):
        provider_options_for("gpu", "metal")
