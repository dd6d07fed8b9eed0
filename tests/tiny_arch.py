"""A tiny random checkpoint of any `model_type`, built from transformers' own config class (no hub access).

tiny_models.py hand-writes configs for the families the project started with; architecture coverage
needs one for every type Optimum exports, so this module shrinks the library's default config instead:
the same small sizes are passed under whatever names that config class uses (its `attribute_map` says
which), so derived fields (`layer_types`, `head_dim` ...) are computed by the class itself.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from tiny_models import build_tokenizer, save_decisive_model

# Standard names -> tiny values; each is passed only when the config class takes it (directly or mapped).
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": 256,
    "head_dim": 16,
    "rotary_dim": 8,  # partial rotary (codegen, gptj): half of the 16-dim heads
    # encoder-decoder families whose decoder Optimum exports as a causal LM
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "ffn_dim": 128,
    "word_embed_proj_dim": 64,
    # mixture-of-experts families
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention (deepseek_v3)
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # gpt_neo: one (global, local) pair of layers
    "attention_types": [[["global", "local"], 1]],
}
# Vision towers of multimodal wrappers (gemma3): the smallest the config classes accept.
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}


def tiny_config_kwargs(model_type: str, sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TINY_SIZES entries this model_type's config class accepts, under its own parameter names.

    A multimodal wrapper's sub-configs are shrunk the same way (text: TINY_SIZES, vision: TINY_VISION).
    """
    cls = type(AutoConfig.for_model(model_type))
    params = set(inspect.signature(cls.__init__).parameters)
    mapped = dict(getattr(cls, "attribute_map", {}) or {})
    out: dict[str, Any] = {}
    for key, sub in (getattr(cls, "sub_configs", None) or {}).items():
        sub_type = getattr(sub, "model_type", "")
        if key in params and sub_type:
            out[key] = tiny_config_kwargs(sub_type, TINY_VISION if "vision" in key else None)
    if "mm_tokens_per_image" in params:
        out["mm_tokens_per_image"] = 4
    for name, value in (sizes or TINY_SIZES).items():
        if name in params:
            out[name] = value
        elif mapped.get(name) in params:
            out.setdefault(mapped[name], value)
    if "kv_lora_rank" in out and "num_key_value_heads" in out:  # latent attention: one KV head per query head
        out["num_key_value_heads"] = out.get("num_attention_heads", TINY_SIZES["num_attention_heads"])
    defaults = inspect.signature(cls.__init__).parameters
    kv_default = defaults["num_key_value_heads"].default if "num_key_value_heads" in defaults else None
    if "partial_rotary_factor" in params and kv_default is None and sizes is None:
        # Partial-rotary families without GQA of their own (phi, nemotron, stablelm): 2 heads of 32 dims, so
        # the rotated part (a multiple of 8 wide, as GroupQueryAttention's rotary cache needs) fits, no GQA.
        for name, value in (("num_key_value_heads", 2), ("head_dim", 32)):
            if name in out:
                out[name] = value
        heads = mapped.get("num_attention_heads", "num_attention_heads")
        heads = heads if heads in params else "num_attention_heads"
        out[heads] = 2
    return out


def build_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-weight checkpoint of `model_type` plus the tiny tokenizer into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    kwargs = {**tiny_config_kwargs(model_type), **overrides}
    ids = {"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    if isinstance(kwargs.get("text_config"), dict):  # multimodal wrapper: the text model owns the vocabulary
        kwargs["text_config"] = {**kwargs["text_config"], **ids}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=bos,
        **kwargs,
    )
    return save_decisive_model(config, folder, seed)
