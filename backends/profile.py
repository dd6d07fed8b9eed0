"""What the scheduler needs to know about a model, without loading its weights.

Sizes are computed from the HF config; byte counts per precision are the weights as our exports and
backends hold them (int4/int8: MatMulNBits with one fp16 scale per 32-weight block), so they are
estimates good to a few percent, which is what placement needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# bytes per weight, including one fp16 scale per block of 32 for the quantized formats
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int8": 1.0 + 2 / 32,
    "int4": 0.5 + 2 / 32,
}
KV_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 4, "int4": 4}
"""KV-cache element size per weight precision: quantized exports keep an fp32 cache on the CPU."""


def _precision_key(precision: str) -> str:
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(BYTES_PER_PARAM)}")
    return precision


@dataclass(frozen=True)
class ModelProfile:
    name: str
    architecture: str  # HF model_type, e.g. "llama"
    num_parameters: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    has_chat_template: bool = False
    tie_word_embeddings: bool = False

    def weight_bytes(self, precision: str) -> int:
        return int(self.num_parameters * BYTES_PER_PARAM[_precision_key(precision)])

    def kv_bytes_per_token(self, precision: str = "fp16") -> int:
        """Key + value bytes one token adds to the cache, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * KV_BYTES[_precision_key(precision)]

    def memory_bytes(self, precision: str, context_tokens: int, batch: int = 1) -> int:
        """Weights plus KV cache for `batch` sequences of `context_tokens` each."""
        return self.weight_bytes(precision) + batch * context_tokens * self.kv_bytes_per_token(precision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def size_label(self) -> str:
        """Parameter count for people: '135M', '7.0B', '99K'."""
        n = self.num_parameters
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def estimate_parameters(config: Any) -> int:
    """Analytic parameter count of a decoder-only transformer from its config (for weight-less profiles)."""
    h = int(_first(config, "hidden_size", "n_embd", "d_model"))
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv = int(_first(config, "num_key_value_heads", "multi_query_group_num", default=heads))
    hd = int(_first(config, "head_dim", default=h // heads))
    inter = int(_first(config, "intermediate_size", "n_inner", "ffn_hidden_size", default=4 * h))
    vocab = int(config.vocab_size)
    gated = getattr(config, "model_type", "") not in {"gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom"}
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    mlp = (3 if gated else 2) * h * inter
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return vocab * h * (1 if tied else 2) + layers * (attn + mlp + 2 * h) + h


def profile_from_config(
    config: Any, name: str, num_parameters: int | None = None, has_chat_template: bool = False
) -> ModelProfile:
    """Build a profile from a transformers PretrainedConfig (or anything with the same attributes)."""
    h = int(_first(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    return ModelProfile(
        name=name,
        architecture=str(getattr(config, "model_type", "unknown")),
        num_parameters=int(num_parameters if num_parameters is not None else estimate_parameters(config)),
        num_layers=int(_first(config, "num_hidden_layers", "n_layer", "num_layers")),
        hidden_size=h,
        num_attention_heads=heads,
        num_kv_heads=int(_first(config, "num_key_value_heads", "multi_query_group_num", default=heads)),
        head_dim=int(_first(config, "head_dim", default=h // heads)),
        vocab_size=int(config.vocab_size),
        context_length=int(_first(config, "max_position_embeddings", "n_positions", "seq_length", default=2048)),
        has_chat_template=has_chat_template,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
