"""Child process: run onnxruntime-genai's model builder on a local HF checkpoint, under transformers 4.57.

    python -m plugin.convert.builder_worker '{"source": ..., "output": ..., "precision": "int4", "options": {...}}'

Why a separate process: the builder (onnxruntime-genai 0.18) was written against transformers 5.x, and
running it here needs two small, process-wide adjustments that must never leak into a serving process:

1. `builders/base.py` imports `Qwen3_5ForConditionalGeneration` and `Qwen3_5MoeForConditionalGeneration`
   from `transformers` at module level; 4.57 has neither. Both are only used to load Qwen3.5 checkpoints,
   so placeholders that refuse to load are installed under those names (any other missing name still fails).
2. transformers 5 configs always carry a `rope_parameters` dict; 4.57 configs carry `rope_theta` plus a
   `rope_scaling` that is `None` for plain RoPE, and the builder iterates `rope_scaling` unguarded. The
   config object is normalized to the 5.x shape (`rope_type` named) before the builder sees it.

Importing `onnxruntime_genai.models` also appends its folder to `sys.path` (its modules import each other
as top-level `builders`, `quantization`, ...), another reason to keep it out of the parent process.
Everything else (graph construction, quantization, genai_config) is the builder's own code, unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# transformers names the builder imports at module level that 4.57 lacks; only Qwen3.5 loading uses them.
TRANSFORMERS_5_ONLY = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


class _NeedsTransformers5:
    """Stands in for a transformers 5.x model class; using it fails with the reason."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError(f"{type(self).__name__} needs transformers 5.x; this project pins transformers 4.57")

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{cls.__name__} needs transformers 5.x; this project pins transformers 4.57")


def install_transformers_placeholders() -> list[str]:
    """Give `transformers` placeholder classes for the 5.x-only names the builder imports; return them."""
    import transformers

    added = []
    for name in TRANSFORMERS_5_ONLY:
        try:
            getattr(transformers, name)
        except (AttributeError, ImportError):
            setattr(transformers, name, type(name, (_NeedsTransformers5,), {}))
            added.append(name)
    return added


def normalize_rope_config(config: Any) -> None:
    """Give a transformers 4.57 config the `rope_scaling`/`rope_type` shape the builder reads (in place)."""
    scaling = getattr(config, "rope_scaling", None)
    if scaling is None:
        config.rope_scaling = {"rope_type": "default"}
    elif isinstance(scaling, dict) and "rope_type" not in scaling and "type" in scaling:
        config.rope_scaling = {**scaling, "rope_type": scaling["type"]}


def config_options(config: Any) -> dict[str, str]:
    """Builder options the checkpoint's config calls for (by what it has, never by its name).

    Sliding-window attention: the builder's default bounded ("windowed") KV cache for local layers makes
    onnxruntime-genai 0.18 refuse every generation whose max_length is below the window ("KV cache
    capacity (16) must be at least local_window_size (4096)", measured on gemma2/gemma3 at fp32). With a
    full-length cache, GroupQueryAttention's `local_window_size` alone masks the window: same tokens,
    any max_length.

    MLP without a gate (nemotron's relu² up/down): the gate/up packing the export asks for by default
    reads `gate_proj`, so it is turned off when the model's MLP modules have none.
    """
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    out = {"windowed_kv_cache": "false"} if isinstance(window, int) and window > 0 else {}
    if not _has_gated_mlp(config):
        out["fuse_mlp_gate_up"] = "false"
    return out


def _has_gated_mlp(config: Any) -> bool:
    """Whether the model's MLP modules have a gate projection (built on the meta device: no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mlps = [m for name, m in model.named_modules() if name.endswith(".mlp")]
    return not mlps or any(hasattr(m, "gate_proj") or hasattr(m, "gate_up_proj") for m in mlps)


def run_builder(source: str, output: str, precision: str, options: dict[str, str], cache_dir: str) -> None:
    """Build the fused ONNX decoder + genai_config of `source` into `output` with the builder's own code."""
    install_transformers_placeholders()
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)
    from onnxruntime_genai.models import builder
    from transformers import AutoConfig

    options = {**options, **config_options(AutoConfig.from_pretrained(source))}
    extra = [f"{k}={v}" for k, v in options.items()]
    parsed = builder.parse_extra_options(None, source, output, precision, "cpu", cache_dir, extra)
    normalize_rope_config(parsed["hf_details"]["hf_config"])
    builder.create_model(None, source, output, precision, "cpu", cache_dir, **parsed)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m plugin.convert.builder_worker '<json arguments>'", file=sys.stderr)
        return 2
    args = json.loads(argv[0])
    Path(args["output"]).mkdir(parents=True, exist_ok=True)
    run_builder(args["source"], args["output"], args["precision"], args.get("options", {}), args["cache_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
