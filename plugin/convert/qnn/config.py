"""genai_config.json for the decoder-pipeline package (onnxruntime-genai 0.18's `decoder-pipeline` type).

The transformer graphs name the QNN provider with HTP options and CPU fallback disabled (a load that
would silently run on the CPU fails instead); embeddings and lm_head have no provider options, so they
run on the CPU. The op_affinity option is only needed while compiling (it pins GroupQueryAttention to
HTP); the `_ctx.onnx` files a load opens hold compiled HTP binaries, so the config carries no file path
and a copied folder loads as is.
"""

from __future__ import annotations

from typing import Any

from plugin.convert.qnn.graphs import (
    EMBEDDINGS,
    HIDDEN_IN,
    HIDDEN_OUT,
    LM_HEAD,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    transformer_io,
)
from plugin.convert.qnn.spec import ModelSpec


def _token(value: Any) -> Any:
    return int(value[0]) if isinstance(value, list) and len(value) == 1 else value


def choose_pad_token(hf_config: dict[str, Any], generation_config: dict[str, Any] | None) -> int:
    """A pad id that never occurs inside a prompt.

    genai counts a windowed prompt's real tokens up to the first `pad_token_id`; SmolLM2 (and many chat
    models) set pad = eos = `<|im_end|>`, which every chat prompt contains. The unk token (or id 0) is
    used instead when pad collides with eos or bos.
    """
    gen = generation_config or {}
    eos = _token(gen.get("eos_token_id", hf_config.get("eos_token_id")))
    bos = _token(gen.get("bos_token_id", hf_config.get("bos_token_id")))
    specials = set(eos if isinstance(eos, list) else [eos]) | {bos}
    for candidate in (gen.get("pad_token_id"), hf_config.get("pad_token_id"), hf_config.get("unk_token_id"), 0):
        if candidate is not None and candidate not in specials:
            return int(candidate)
    return int(hf_config.get("vocab_size", 1)) - 1


def htp_session_options(provider_options: dict[str, str]) -> dict[str, Any]:
    return {
        "log_id": "onnxruntime-genai",
        "intra_op_num_threads": 1,
        "session.disable_cpu_ep_fallback": "1",
        "provider_options": [{"qnn": dict(provider_options)}],
    }


def build_pipeline_config(
    spec: ModelSpec,
    hf_config: dict[str, Any],
    generation_config: dict[str, Any] | None,
    *,
    window: int,
    context_length: int,
    context_file: str,
    iterator_file: str,
    provider_options: dict[str, str],
) -> dict[str, Any]:
    """The genai_config dict (pure function). `provider_options` are the QNN options for loading."""
    gen = generation_config or {}
    eos = _token(gen.get("eos_token_id", hf_config.get("eos_token_id")))
    bos = _token(gen.get("bos_token_id", hf_config.get("bos_token_id")))
    pad = choose_pad_token(hf_config, generation_config)
    t_in, t_out = transformer_io(spec)
    emb_in = ["input_ids", "past_seq_len"] if spec.positions is not None else ["input_ids"]
    htp = htp_session_options(provider_options)
    top_k = gen.get("top_k")
    return {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": bos if bos is not None else (eos[0] if isinstance(eos, list) else eos),
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": spec.vocab,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": spec.hidden,
                "num_attention_heads": spec.heads,
                "num_key_value_heads": spec.kv_heads,
                "num_hidden_layers": len(spec.layers),
                "head_size": spec.head_dim,
                "sliding_window": {
                    "window_size": window,
                    "pad_value": 0,
                    "alignment": "left",
                    "slide_key_value_cache": False,
                },
                "inputs": {
                    "input_ids": "input_ids",
                    "past_sequence_length": "past_seq_len",
                    "total_sequence_length": "total_seq_len",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "pipeline": [
                    {
                        "embeddings": {
                            "filename": EMBEDDINGS,
                            "inputs": emb_in,
                            "outputs": [HIDDEN_IN],
                        },
                        "context": {
                            "filename": context_file,
                            "inputs": t_in,
                            "outputs": t_out,
                            "run_on_token_gen": False,
                            "session_options": htp,
                        },
                        "iterator": {
                            "filename": iterator_file,
                            "inputs": t_in,
                            "outputs": t_out,
                            "run_on_prompt": False,
                            "session_options": htp,
                        },
                        "lm_head": {
                            "filename": LM_HEAD,
                            "inputs": [HIDDEN_OUT],
                            "outputs": ["logits"],
                            "is_lm_head": True,
                        },
                    }
                ],
            },
        },
        "search": {
            "max_length": context_length,
            "min_length": 0,
            "do_sample": bool(gen.get("do_sample", False)),
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(top_k) if top_k is not None else 50,
            "top_p": float(gen.get("top_p", 1.0)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def cpu_config(config: dict[str, Any], context_file: str, iterator_file: str) -> dict[str, Any]:
    """A copy of `config` whose transformer graphs run on the CPU provider (the QDQ graphs, not the binaries).

    A whole config to write beside the files (e.g. in a folder of links to them), not an `og.Config`
    overlay: an overlay merges into the stage's session_options and cannot drop the QNN provider or the
    fallback switch.
    """
    import copy

    out = copy.deepcopy(config)
    stages = out["model"]["decoder"]["pipeline"][0]
    for stage, filename in (("context", context_file), ("iterator", iterator_file)):
        stages[stage]["filename"] = filename
        stages[stage]["session_options"] = {"log_id": "onnxruntime-genai", "provider_options": []}
    return out
