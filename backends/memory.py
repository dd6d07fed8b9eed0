"""The one memory budget: how many bytes a device may hold, and whether weights plus a batch's KV cache fit.

The scheduler (will a model fit this device?), the engine (admit one more request to a loaded backend? make
room by unloading idle ones?) and the torch backend (refuse to load a model that cannot fit) all ask these
functions, so they can never disagree.

- A device may use `MEMORY_FRACTION` of its memory: GPU 90 % (the CUDA context, activations and allocator
  fragmentation take the rest); CPU and NPU 75 % (system RAM is shared with the OS and the server).
- A simulated device's weights really live in host RAM, so it also has to fit the CPU's share.
- A batch's KV cache is counted as the torch backend lays it out: every row left-padded to the longest row
  (rows x longest x bytes per token). For independent generators (onnxruntime-genai) that is an upper bound.
"""

from __future__ import annotations

from collections.abc import Sequence

MEMORY_FRACTION: dict[str, float] = {"gpu": 0.90, "npu": 0.75, "cpu": 0.75}


def device_budget(
    kind: str, memory_bytes: int, *, simulated: bool = False, host_memory_bytes: int | None = None
) -> int:
    """Bytes a device of `kind` with `memory_bytes` may hold for models (weights + KV cache)."""
    if kind not in MEMORY_FRACTION:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {sorted(MEMORY_FRACTION)}")
    budget = int(memory_bytes * MEMORY_FRACTION[kind])
    if simulated and host_memory_bytes is not None:
        budget = min(budget, int(host_memory_bytes * MEMORY_FRACTION["cpu"]))
    return budget


def kv_cache_bytes(kv_tokens: Sequence[int], bytes_per_token: int) -> int:
    """KV bytes of a batch whose rows reach these lengths (prompt + max_new_tokens each), padded to the longest."""
    return len(kv_tokens) * max(kv_tokens, default=0) * bytes_per_token


def fits(weight_bytes: int, kv_tokens: Sequence[int], bytes_per_token: int, budget: int) -> bool:
    """Whether weights plus the batch's KV cache fit `budget`."""
    return weight_bytes + kv_cache_bytes(kv_tokens, bytes_per_token) <= budget
