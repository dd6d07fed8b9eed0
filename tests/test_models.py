"""Model sources: folders, GGUF files (a tiny llama written as GGUF here), the hub cache, and bad references."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import plugin.models.gguf_import as gguf_import
from plugin.cache import COMPLETE_MARKER, build_once, is_complete
from plugin.home import accelserve_home
from plugin.models.resolve import ModelSourceError, ResolvedModel, resolve_model

TEXT = "<|im_start|>user\nHéllo wörld 東京 Привет 🙂 The capital of France is Paris 42!<|im_end|>"


# ---------------------------------------------------------------- helpers


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of what transformers undoes when it reads a llama GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_folder: Path, out: Path) -> Path:
    """Write a tiny HF llama checkpoint as an F32 GGUF, the way llama.cpp's converter lays it out."""
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    cfg = model.config
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(AutoTokenizer.from_pretrained(hf_folder).chat_template)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(
            f"blk.{i}.attn_q.weight", _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight", _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        )
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def genai_tokenizer(folder: Path, scratch: Path):
    """onnxruntime-genai's tokenizer over a checkpoint's tokenizer files, without exporting a model.

    og.Tokenizer(path) reads genai_config.json only for token ids and model type; no ONNX file is opened,
    so a minimal config beside copies of the tokenizer files is enough to run its real tokenizer.
    """
    import onnxruntime_genai as og

    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, scratch / name)
    cfg = json.loads((folder / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    decoder = {
        "filename": "model.onnx",
        "head_size": cfg["hidden_size"] // heads,
        "hidden_size": cfg["hidden_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads", heads),
        "num_hidden_layers": cfg["num_hidden_layers"],
        "inputs": {"input_ids": "input_ids"},
        "outputs": {"logits": "logits"},
    }
    model = {
        "type": cfg["model_type"],
        "vocab_size": cfg["vocab_size"],
        "context_length": cfg["max_position_embeddings"],
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"],
        "decoder": decoder,
    }
    (scratch / "genai_config.json").write_text(json.dumps({"model": model}))
    return og.Tokenizer(str(scratch))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_factory, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_model_factory("llama"), tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def _entries(home: Path) -> list[str]:
    """What a conversion left in the models folder, lock files aside."""
    models = home / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) if models.exists() else []


# ---------------------------------------------------------------- home


def test_home_follows_env_and_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_HOME", str(tmp_path / "a" / "b"))
    assert accelserve_home() == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    monkeypatch.delenv("ACCELSERVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert accelserve_home() == tmp_path / "user" / ".cache" / "accelserve"
    assert accelserve_home().is_dir()


# ---------------------------------------------------------------- folders and profiles


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gpt2"])
def test_folder_profile_matches_the_torch_model(arch, tiny_model_factory, accelserve_home):
    folder = tiny_model_factory(arch)
    resolved = resolve_model(folder)
    assert isinstance(resolved, ResolvedModel)
    assert resolved.source == "folder" and resolved.path == folder.resolve() and resolved.ref == str(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prof = resolved.profile
    assert prof.num_parameters == sum(p.numel() for p in model.parameters())
    assert prof.architecture == arch
    assert prof.num_layers == 2 and prof.hidden_size == 64 and prof.num_attention_heads == 4
    kv_heads = {"phi3": 4, "gpt2": 4}.get(arch, 2)
    assert prof.num_kv_heads == kv_heads and prof.head_dim == 64 // 4
    assert prof.context_length == 256
    assert prof.has_chat_template
    # key + value, per layer, per kv head, head_dim elements of 2 (fp16) or 4 (fp32) bytes
    assert prof.kv_bytes_per_token("fp16") == 2 * 2 * kv_heads * 16 * 2
    assert prof.kv_bytes_per_token("fp32") == 2 * 2 * kv_heads * 16 * 4
    assert prof.weight_bytes("fp32") == 4 * prof.num_parameters


def test_llama_parameter_count_by_hand(tiny_llama, accelserve_home):
    prof = resolve_model(tiny_llama).profile
    vocab = prof.vocab_size
    attn = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v (2 kv heads x 16), o
    mlp = 3 * 64 * 128  # gate, up, down
    norms = 2 * 64
    # tied embeddings: one vocab x hidden matrix, plus the final norm
    assert prof.num_parameters == vocab * 64 + 2 * (attn + mlp + norms) + 64
    assert prof.tie_word_embeddings


def test_path_and_str_refs_resolve_alike(tiny_llama, accelserve_home):
    assert resolve_model(str(tiny_llama)).path == resolve_model(Path(tiny_llama)).path


# ---------------------------------------------------------------- GGUF


def test_gguf_converts_to_an_equivalent_checkpoint(tiny_gguf, tiny_llama, accelserve_home, tmp_path):
    resolved = resolve_model(tiny_gguf)
    assert resolved.source == "gguf"
    assert resolved.path.parent == accelserve_home / "models"
    assert resolved.path.name.startswith("tiny-llama.f32-")
    assert is_complete(resolved.path)
    marker = json.loads((resolved.path / COMPLETE_MARKER).read_text())
    assert marker["tokenizer"] == "rebuilt byte-level BPE" and marker["seconds"] >= 0

    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    converted = AutoModelForCausalLM.from_pretrained(resolved.path)
    assert resolved.profile.num_parameters == sum(p.numel() for p in original.parameters())
    ids = torch.tensor([[1, 5, 17, 42, 99, 200, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)

    # the rebuilt tokenizer reproduces the original ids, special tokens included, with no BOS added
    tok_orig = AutoTokenizer.from_pretrained(tiny_llama)
    tok_conv = AutoTokenizer.from_pretrained(resolved.path)
    assert tok_conv(TEXT).input_ids == tok_orig(TEXT).input_ids
    assert tok_conv.decode(tok_conv(TEXT).input_ids) == TEXT
    assert set(tok_conv("hi").keys()) == {"input_ids", "attention_mask"}  # generate(**inputs) must accept them
    msgs = [{"role": "user", "content": "Hello"}]
    assert tok_conv.apply_chat_template(msgs, add_generation_prompt=True) == tok_orig.apply_chat_template(
        msgs, add_generation_prompt=True
    )
    # special ids agree everywhere a runtime may read them
    cfg = json.loads((resolved.path / "config.json").read_text())
    gen = json.loads((resolved.path / "generation_config.json").read_text())
    ids_expected = {
        "bos_token_id": tok_orig.convert_tokens_to_ids("<|im_start|>"),
        "eos_token_id": tok_orig.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok_orig.convert_tokens_to_ids("<|endoftext|>"),
    }
    for key, value in ids_expected.items():
        assert cfg[key] == value and gen[key] == value
    assert tok_conv.bos_token_id == ids_expected["bos_token_id"]
    assert tok_conv.eos_token_id == ids_expected["eos_token_id"]
    assert tok_conv.pad_token_id == ids_expected["pad_token_id"]


def test_gguf_tokenizer_ids_match_onnxruntime_genai(tiny_gguf, accelserve_home, tmp_path):
    resolved = resolve_model(tiny_gguf)
    hf = AutoTokenizer.from_pretrained(resolved.path)
    og_tok = genai_tokenizer(resolved.path, tmp_path / "og")
    for text in (TEXT, "def main():\n    return 42\n", "  two  spaces\tand tab"):
        assert [int(i) for i in og_tok.encode(text)] == hf(text).input_ids


def test_second_gguf_resolve_is_a_cache_hit(tiny_gguf, accelserve_home, monkeypatch):
    first = resolve_model(tiny_gguf)

    def must_not_run(*a, **k):
        raise AssertionError("converted again although a finished entry exists")

    monkeypatch.setattr(gguf_import, "convert_gguf", must_not_run)
    monkeypatch.setattr(gguf_import, "read_gguf_info", must_not_run)
    second = resolve_model(str(tiny_gguf))  # a cache hit: converting or even reading the GGUF would raise
    assert second.path == first.path and second.profile == first.profile
    assert _entries(accelserve_home) == [first.path.name]


def test_changed_gguf_gets_its_own_entry(tiny_gguf, accelserve_home, tmp_path):
    copy = tmp_path / tiny_gguf.name
    shutil.copy(tiny_gguf, copy)
    with copy.open("ab") as f:  # trailing bytes change the content hash but not the model
        f.write(b"\0" * 32)
    assert resolve_model(copy).path != resolve_model(tiny_gguf).path


def test_failure_mid_conversion_leaves_nothing_finished(tiny_gguf, accelserve_home, monkeypatch):
    real = gguf_import._tokenizer_for

    def write_then_fail(info, out, context):
        (out / "config.json").write_text("{}")  # something already on disk when it breaks
        raise RuntimeError("simulated crash while converting")

    monkeypatch.setattr(gguf_import, "_tokenizer_for", write_then_fail)
    with pytest.raises(ModelSourceError, match=r"converting the GGUF .* failed .*simulated crash") as info:
        resolve_model(tiny_gguf)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _entries(accelserve_home) == []  # no target, no partial folder

    monkeypatch.setattr(gguf_import, "_tokenizer_for", real)
    resolved = resolve_model(tiny_gguf)
    assert is_complete(resolved.path)


def test_unmarked_leftovers_are_rebuilt(tiny_gguf, accelserve_home):
    """A target without a marker (e.g. copied by hand, or from an older crash) is never trusted."""
    target = resolve_model(tiny_gguf).path
    (target / COMPLETE_MARKER).unlink()
    (target / "model.safetensors").write_bytes(b"garbage")
    partial = target.parent / f".{target.name}.partial-abandoned"
    partial.mkdir()
    resolved = resolve_model(tiny_gguf)
    assert is_complete(resolved.path) and not partial.exists()
    AutoModelForCausalLM.from_pretrained(resolved.path)  # the garbage weights were replaced


def test_concurrent_builds_run_once(tmp_path):
    calls: list[int] = []
    results: list[Path] = []

    def slow_build(tmp: Path) -> dict:
        calls.append(1)
        time.sleep(0.5)
        (tmp / "data").write_text("x")
        return {}

    threads = [
        threading.Thread(target=lambda: results.append(build_once(tmp_path / "entry", slow_build, what="t")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "entry"] * 3
    assert (tmp_path / "entry" / "data").read_text() == "x"


# ---------------------------------------------------------------- bad references


def _raises(ref, *fragments: str, home: Path) -> str:
    with pytest.raises(ModelSourceError) as info:
        resolve_model(ref, home=home)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in: {msg}"
    return msg


def test_model_source_error_is_a_value_error():
    assert issubclass(ModelSourceError, ValueError)


def test_missing_paths(tmp_path):
    for ref in (str(tmp_path / "no-such-model"), "./no/such/folder", "~/nope/model.gguf", "missing.gguf"):
        _raises(ref, ref, "does not exist", "Check the path", home=tmp_path)
    _raises(tmp_path / "gone", "does not exist", home=tmp_path)


def test_folder_without_config(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    _raises(str(folder), str(folder), "no config.json", "save_pretrained", home=tmp_path)


def test_folder_with_only_a_gguf_points_at_the_file(tmp_path, tiny_gguf):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / tiny_gguf.name)
    _raises(str(folder), "no config.json", f"holds {tiny_gguf.name}", home=tmp_path)


def test_unknown_architecture(tmp_path, tiny_llama):
    folder = tmp_path / "weird"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "nonexistent_arch"
    (folder / "config.json").write_text(json.dumps(cfg))
    _raises(str(folder), str(folder), "unknown architecture 'nonexistent_arch'", "supported family", home=tmp_path)


def test_not_a_causal_lm(tmp_path, tiny_llama):
    folder = tmp_path / "vision"
    shutil.copytree(tiny_llama, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    _raises(str(folder), "'vit' is not a causal", home=tmp_path)


def test_folder_without_weights(tmp_path, tiny_llama):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").unlink()
    _raises(str(folder), str(folder), "no weights", home=tmp_path)


def test_random_bytes_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    _raises(str(bad), str(bad), "not a usable GGUF", "GGUF magic", home=tmp_path)
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("keep", [0.5, 0.9999, 0.001])
def test_truncated_gguf(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: max(8, int(len(data) * keep))])
    _raises(str(bad), str(bad), "not a usable GGUF", "corrupt or truncated", home=tmp_path)
    assert _entries(tmp_path) == []


def test_file_that_is_not_gguf(tmp_path, tiny_llama):
    _raises(str(tiny_llama / "model.safetensors"), "is a file but not a .gguf", home=tmp_path)


def test_uncached_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    _raises("someorg/some-model", "'someorg/some-model'", "huggingface-cli download someorg/some-model", home=tmp_path)
    _raises("gpt2", "nor a model in the local Hugging Face cache", home=tmp_path)


def test_empty_reference(tmp_path):
    _raises("  ", "empty model reference", home=tmp_path)


# ---------------------------------------------------------------- hub cache


def test_hub_id_in_local_cache(tmp_path, tiny_llama, monkeypatch):
    """A model laid out the way huggingface_hub caches it resolves offline, with source 'hub-cache'."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--someorg--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    resolved = resolve_model("someorg/tiny-llama", home=tmp_path / "home")
    assert resolved.source == "hub-cache"
    assert resolved.path == repo / "snapshots" / commit
    assert resolved.profile.name == "someorg/tiny-llama"
    assert resolved.profile.num_parameters == resolve_model(tiny_llama, home=tmp_path / "home").profile.num_parameters
