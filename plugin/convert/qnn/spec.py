"""The checkpoint as the pipeline needs it: per-layer numpy weights in one layout for every family.

The HTP graphs are written by hand (graphs.py) rather than converted from the Optimum or builder graphs:
those have dynamic shapes, MatMulNBits and ops HTP does not run, and rewriting them costs more than
emitting the few ops a decoder layer needs. This module reads the HF checkpoint through transformers
(so every weight layout is the one torch runs) and reshapes it into `ModelSpec`. The refusal reasons
for checkpoints the pipeline cannot express live here too, so `export()` can refuse before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plugin.convert.errors import ExportError

# HF model_type -> how its layers are laid out (all run the same graph shape, see graphs.py).
FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gpt2")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass
class LayerWeights:
    """One decoder layer; matrices are [in, out] (what MatMul takes), biases may be None."""

    norm1: np.ndarray
    norm1_bias: np.ndarray | None
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    norm2: np.ndarray
    norm2_bias: np.ndarray | None
    w_up: np.ndarray  # gated MLP: up; gpt2: c_fc
    w_down: np.ndarray
    w_gate: np.ndarray | None = None
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None
    b_up: np.ndarray | None = None
    b_down: np.ndarray | None = None


@dataclass
class ModelSpec:
    """Everything graphs.py needs; `norm` is "rms" (llama family) or "layer" (gpt2)."""

    arch: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norm: str
    eps: float
    activation: str  # "silu_gated" | "gelu_tanh"
    embed: np.ndarray  # [vocab, hidden]
    final_norm: np.ndarray
    final_norm_bias: np.ndarray | None
    lm_head: np.ndarray  # [vocab, hidden] (Gemm transB=1), the embedding itself when tied
    tied: bool
    layers: list[LayerWeights] = field(default_factory=list)
    positions: np.ndarray | None = None  # learned absolute positions [max_pos, hidden] (gpt2)
    cos: np.ndarray | None = None  # rotary caches [context_length, head_dim/2] (GQA do_rotary)
    sin: np.ndarray | None = None


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def qnn_unsupported_reason(hf_config: dict[str, Any], context_length: int) -> str | None:
    """Why this checkpoint cannot become an HTP pipeline (None = it can). Pure: runs before any work."""
    arch = str(hf_config.get("model_type", ""))
    if arch not in FAMILIES:
        return f"the HTP pipeline is written for {', '.join(FAMILIES)}; {arch!r} is not one of them"
    if hf_config.get("quantization_config"):
        return "the checkpoint is pre-quantized (quantization_config); the HTP pipeline starts from float weights"
    if arch == "gpt2":
        act = hf_config.get("activation_function", "gelu_new")
        if act not in _GELU_TANH:
            return f"gpt2 activation {act!r} is not the tanh-approximated GELU the pipeline writes"
        positions = int(_get(hf_config, "n_positions", "max_position_embeddings", default=1024))
        if context_length > positions:
            return (
                f"gpt2 learns {positions} absolute positions; context_length {context_length} would index past "
                f"them (use context_length <= {positions})"
            )
        return None
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r}: the pipeline writes the SiLU-gated MLP of the llama family"
    if float(hf_config.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "partial rotary embeddings are not written by the HTP pipeline (GroupQueryAttention rotates all dims)"
    window = hf_config.get("sliding_window")
    uses_window = hf_config.get("use_sliding_window", arch in ("mistral", "phi3"))
    if window and uses_window and context_length > int(window):
        return f"{arch} attends within a {window}-token sliding window; use context_length <= {window}"
    rope = hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "longrope", "yarn", "su"):
        return f"rope_scaling type {rope_type!r} changes with the sequence length; the HTP caches are static"
    return None


def _t(x: Any) -> np.ndarray:
    return x.detach().float().numpy().copy()


def _rotary(model: Any, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [context_length, head_dim/2] from the model's own rotary module (scaling included)."""
    import torch

    rotary = model.model.rotary_emb
    pos = torch.arange(context_length)[None]
    dummy = torch.zeros(1, context_length, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(dummy, pos)
    half = cos.shape[-1] // 2
    # HF duplicates the halves (rotate_half layout); GroupQueryAttention takes one half, non-interleaved.
    return _t(cos[0, :, :half]), _t(sin[0, :, :half])


def _llama_like(model: Any, cfg: Any, arch: str, context_length: int) -> ModelSpec:
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inner = model.model
    layers = []
    for layer in inner.layers:
        att, mlp = layer.self_attn, layer.mlp
        if arch == "phi3":
            qkv = _t(att.qkv_proj.weight)  # [(h + 2 kv) * d, hidden]
            q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
            wq, wk, wv = qkv[:q_end].T, qkv[q_end:k_end].T, qkv[k_end:].T
            bq = bk = bv = None
            gate_up = _t(mlp.gate_up_proj.weight)
            w_gate, w_up = gate_up[: gate_up.shape[0] // 2].T, gate_up[gate_up.shape[0] // 2 :].T
        else:
            wq, wk, wv = (_t(p.weight).T for p in (att.q_proj, att.k_proj, att.v_proj))
            bq, bk, bv = (_t(p.bias) if p.bias is not None else None for p in (att.q_proj, att.k_proj, att.v_proj))
            w_gate, w_up = _t(mlp.gate_proj.weight).T, _t(mlp.up_proj.weight).T
        bo = _t(att.o_proj.bias) if getattr(att.o_proj, "bias", None) is not None else None
        layers.append(
            LayerWeights(
                norm1=_t(layer.input_layernorm.weight),
                norm1_bias=None,
                wq=np.ascontiguousarray(wq),
                wk=np.ascontiguousarray(wk),
                wv=np.ascontiguousarray(wv),
                wo=_t(att.o_proj.weight).T.copy(),
                norm2=_t(layer.post_attention_layernorm.weight),
                norm2_bias=None,
                w_gate=np.ascontiguousarray(w_gate),
                w_up=np.ascontiguousarray(w_up),
                w_down=_t(mlp.down_proj.weight).T.copy(),
                bq=bq,
                bk=bk,
                bv=bv,
                bo=bo,
            )
        )
    cos, sin = _rotary(model, context_length)
    embed = _t(inner.embed_tokens.weight)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    lm_head = embed if tied else _t(model.lm_head.weight)
    return ModelSpec(
        arch=arch,
        hidden=cfg.hidden_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=embed.shape[0],
        norm="rms",
        eps=float(cfg.rms_norm_eps),
        activation="silu_gated",
        embed=embed,
        final_norm=_t(inner.norm.weight),
        final_norm_bias=None,
        lm_head=lm_head,
        tied=tied,
        layers=layers,
        cos=cos,
        sin=sin,
    )


def _gpt2(model: Any, cfg: Any) -> ModelSpec:
    h = cfg.n_embd
    tr = model.transformer
    layers = []
    for block in tr.h:
        c_attn, c_attn_b = _t(block.attn.c_attn.weight), _t(block.attn.c_attn.bias)  # Conv1D: [in, out]
        layers.append(
            LayerWeights(
                norm1=_t(block.ln_1.weight),
                norm1_bias=_t(block.ln_1.bias),
                wq=c_attn[:, :h].copy(),
                wk=c_attn[:, h : 2 * h].copy(),
                wv=c_attn[:, 2 * h :].copy(),
                bq=c_attn_b[:h].copy(),
                bk=c_attn_b[h : 2 * h].copy(),
                bv=c_attn_b[2 * h :].copy(),
                wo=_t(block.attn.c_proj.weight),
                bo=_t(block.attn.c_proj.bias),
                norm2=_t(block.ln_2.weight),
                norm2_bias=_t(block.ln_2.bias),
                w_up=_t(block.mlp.c_fc.weight),
                b_up=_t(block.mlp.c_fc.bias),
                w_down=_t(block.mlp.c_proj.weight),
                b_down=_t(block.mlp.c_proj.bias),
            )
        )
    embed = _t(tr.wte.weight)
    return ModelSpec(
        arch="gpt2",
        hidden=h,
        heads=cfg.n_head,
        kv_heads=cfg.n_head,
        head_dim=h // cfg.n_head,
        vocab=embed.shape[0],
        norm="layer",
        eps=float(cfg.layer_norm_epsilon),
        activation="gelu_tanh",
        embed=embed,
        final_norm=_t(tr.ln_f.weight),
        final_norm_bias=_t(tr.ln_f.bias),
        lm_head=embed,
        tied=True,
        layers=layers,
        positions=_t(tr.wpe.weight),
    )


def load_spec(source: Path, context_length: int) -> ModelSpec:
    """Read `source` (an HF folder) into a ModelSpec; raises ExportError for checkpoints the pipeline refuses."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(source)
    reason = qnn_unsupported_reason(cfg.to_dict(), context_length)
    if reason:
        raise ExportError(f"cannot export {source} for the NPU (QNN HTP): {reason}")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    if cfg.model_type == "gpt2":
        return _gpt2(model, cfg)
    return _llama_like(model, cfg, cfg.model_type, context_length)
