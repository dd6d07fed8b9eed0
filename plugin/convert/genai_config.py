"""Write onnxruntime-genai's `genai_config.json` for a plain Optimum decoder graph.

onnxruntime-genai's own model builder cannot run beside optimum-onnx's transformers pin, so the config is
written here: graph input/output names come from the ONNX file itself (never assumed per architecture),
sizes from the HF config, token ids and search defaults from generation_config.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from plugin.convert.errors import ExportError

# The plain Optimum graph computes every architecture detail itself (rotary variant, soft-capping, scaling,
# norms, biases, sliding windows through the attention mask), so onnxruntime-genai only has to feed a
# standard decoder: inputs input_ids/attention_mask/position_ids/past_key_values.N.*, outputs logits and
# present.N.*. Its "llama" model type is that generic decoder-only runner for every architecture (its
# per-family types, e.g. "gpt2", expect the builder's own input layout instead).
PLAIN_GRAPH_MODEL_TYPE = "llama"

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class GraphIO:
    """Names read from the exported decoder graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_layers: int
    kv_heads: int | None
    head_dim: int | None
    float_type: str  # "float32" | "float16"


def read_graph_io(model_path: Path) -> GraphIO:
    """Read the decoder's input/output names and KV geometry without loading its weights."""
    model = onnx.load(str(model_path), load_external_data=False)
    inputs = tuple(i.name for i in model.graph.input)
    outputs = tuple(o.name for o in model.graph.output)
    layers = {int(m.group(1)) for n in inputs if (m := _PAST_RE.match(n))}
    kv_heads = head_dim = None
    float_type = "float32"
    for i in model.graph.input:
        if _PAST_RE.match(i.name):
            dims = i.type.tensor_type.shape.dim
            if len(dims) == 4:
                kv_heads = dims[1].dim_value or None
                head_dim = dims[3].dim_value or None
            if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
                float_type = "float16"
            break
    return GraphIO(inputs, outputs, len(layers), kv_heads, head_dim, float_type)


def _check_io(io: GraphIO) -> None:
    missing = [n for n in ("input_ids",) if n not in io.inputs]
    if "logits" not in io.outputs:
        missing.append("logits (output)")
    if io.num_layers == 0:
        missing.append("past_key_values.N.key/value")
    presents = {n for n in io.outputs if _PRESENT_RE.match(n)}
    if len(presents) != 2 * io.num_layers:
        missing.append("present.N.key/value (output)")
    if missing:
        raise ExportError(
            f"the exported ONNX graph lacks {', '.join(missing)}; onnxruntime-genai needs a decoder with a KV "
            "cache. Re-export with task 'text-generation-with-past' (this is a bug if export() produced it)."
        )


def _first(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _token_id(value: Any) -> Any:
    """genai accepts an int or a list for eos; keep lists of one as an int."""
    if isinstance(value, list) and len(value) == 1:
        return int(value[0])
    return value


def _sizes(hf_config: dict[str, Any]) -> dict[str, Any]:
    """hidden size, heads, layers, positions under their standard names, whatever this config class calls them.

    transformers' config class resolves its own aliases (`attribute_map`: n_embd, d_model, n_head ...); a
    multimodal wrapper's text model (`text_config`) holds the decoder's sizes.
    """
    from transformers import AutoConfig

    flat = {**hf_config, **(hf_config.get("text_config") or {})}
    model_type = str(flat.get("model_type") or hf_config.get("model_type", ""))
    try:
        cfg: Any = AutoConfig.for_model(model_type, **{k: v for k, v in flat.items() if k != "model_type"})
    except (KeyError, ValueError, TypeError):
        cfg = None
    names = ("hidden_size", "num_attention_heads", "max_position_embeddings", "n_positions", "n_ctx")
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(cfg, name, None) if cfg is not None else None
        out[name] = value if value is not None else flat.get(name)
    return out


def build_genai_config(
    hf_config: dict[str, Any],
    generation_config: dict[str, Any] | None,
    io: GraphIO,
    filename: str,
    provider_options: list[dict[str, Any]],
    past_present_share_buffer: bool = False,
) -> dict[str, Any]:
    """Assemble the genai_config dict (pure function, for tests)."""
    _check_io(io)
    gen = generation_config or {}
    sizes = _sizes(hf_config)
    hidden = int(sizes["hidden_size"])
    heads = int(sizes["num_attention_heads"])
    # KV geometry as the graph has it (MQA, latent attention, multi_query flags differ in name per config)
    kv_heads = int(io.kv_heads or _first(hf_config, "num_key_value_heads", default=heads))
    head_dim = int(io.head_dim or _first(hf_config, "head_dim", default=hidden // heads))
    layers = io.num_layers
    context = int(_first(sizes, "max_position_embeddings", "n_positions", "n_ctx", default=2048))

    inputs: dict[str, str] = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in io.inputs:
            inputs[name] = name
    inputs["past_key_names"] = "past_key_values.%d.key"
    inputs["past_value_names"] = "past_key_values.%d.value"
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}

    eos = _token_id(_first(gen, "eos_token_id", default=hf_config.get("eos_token_id")))
    bos = _token_id(_first(gen, "bos_token_id", default=hf_config.get("bos_token_id")))
    pad = _token_id(_first(gen, "pad_token_id", default=hf_config.get("pad_token_id")))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ExportError("neither config.json nor generation_config.json names an eos_token_id; add one and retry")
    model: dict[str, Any] = {
        "bos_token_id": bos if bos is not None else (eos[0] if isinstance(eos, list) else eos),
        "context_length": context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
            "filename": filename,
            "head_size": head_dim,
            "hidden_size": hidden,
            "inputs": inputs,
            "outputs": outputs,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads,
        },
        "eos_token_id": eos,
        "pad_token_id": pad,
        "type": PLAIN_GRAPH_MODEL_TYPE,
        "vocab_size": int(
            _first(hf_config, "vocab_size", default=(hf_config.get("text_config") or {}).get("vocab_size"))
        ),
    }
    top_k = gen.get("top_k")
    search = {
        "diversity_penalty": 0.0,
        "do_sample": bool(gen.get("do_sample", False)),
        "early_stopping": True,
        "length_penalty": float(gen.get("length_penalty", 1.0)),
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": int(gen.get("no_repeat_ngram_size", 0)),
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": past_present_share_buffer,
        "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
        "temperature": float(gen.get("temperature", 1.0)),
        "top_k": int(top_k) if top_k is not None else 50,
        "top_p": float(gen.get("top_p", 1.0)),
    }
    return {"model": model, "search": search}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_genai_config(
    folder: Path, source: Path, filename: str, provider_options: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write `folder/genai_config.json` for `folder/filename`, reading the HF config from `source`."""
    hf_config = _read_json(source / "config.json")
    if hf_config is None:
        raise ExportError(f"{source} has no config.json; point at a Hugging Face model folder")
    io = read_graph_io(folder / filename)
    config = build_genai_config(
        hf_config, _read_json(source / "generation_config.json"), io, filename, provider_options
    )
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return config
