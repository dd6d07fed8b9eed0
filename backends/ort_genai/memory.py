"""What an onnxruntime-genai export reserves in the process's memory ledger (backends/memory.py) when it loads.

- weights: the bytes of the export's graph and weight files (what the session maps or copies in);
- KV cache: 2 x layers x kv_heads x head_size per token at the cache's element size (fp32 for the quantized
  CPU exports, fp16 for fp16 ones), at least one sequence of min(context, LOAD_KV_TOKENS) tokens, at most a
  full batch at full context, times BATCHED_KV_SLACK when decode steps are shared (the batched path's
  buffers round rows up to a power of two and lengths up by a quarter, in blocks of 64 positions);
- activations: one prompt's prefill and a full batch's logits (the same allowance the torch backend uses),
  plus, when batched, the old buffers alive while the cache grows (kv_transient = 1).

Where the memory lives: system RAM for the CPU provider, a simulated device and NPUs that share host memory
(QNN on Snapdragon, OpenVINO on Intel), so those reserve in the host ledger. A GPU provider (CUDA, DirectML)
allocates outside torch's allocator, where this process cannot tell its own share from other processes', so
it is not reserved (and the load says so in the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.memory import LOAD_KV_TOKENS, activation_bytes
from backends.profile import KV_BYTES

WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".bin")
BATCHED_KV_SLACK = 2.5
"""The batched path's KV buffers may hold up to this many times what its rows use (rows doubled, length +25%)."""


@dataclass(frozen=True)
class ExportNeeds:
    """Bytes an export needs: weights, activations beside the KV cache, and the KV cache (per token, one
    sequence at load, a full batch at full context)."""

    weights: int
    activations: int
    kv_bytes_per_token: int
    one_sequence_kv: int
    full_batch_kv: int


def weight_file_bytes(model_dir: Path) -> int:
    """Bytes of the export's graph and weight files (a pipeline package's sub-folders included)."""
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def export_needs(model_dir: Path, config: dict[str, Any], precision: str, *, max_batch: int) -> ExportNeeds:
    """Size an export from its genai_config.json and files; a field the config lacks counts as zero."""
    model = config.get("model", {})
    decoder = model.get("decoder", {})
    context = int(model.get("context_length") or config.get("search", {}).get("max_length") or 0)
    layers = int(decoder.get("num_hidden_layers") or 0)
    kv_heads = int(decoder.get("num_key_value_heads") or decoder.get("num_attention_heads") or 0)
    per_token = 2 * layers * kv_heads * int(decoder.get("head_size") or 0) * KV_BYTES.get(precision, 4)
    prefill = min(context, LOAD_KV_TOKENS)
    activations = activation_bytes(
        hidden_size=int(decoder.get("hidden_size") or 0),
        vocab_size=int(model.get("vocab_size") or 0),
        element_bytes=4,
        prefill_tokens=prefill,
        max_batch=max_batch,
    )
    return ExportNeeds(
        weights=weight_file_bytes(model_dir),
        activations=activations,
        kv_bytes_per_token=per_token,
        one_sequence_kv=prefill * per_token,
        full_batch_kv=max_batch * context * per_token,
    )
