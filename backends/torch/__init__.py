"""torch/transformers backend: HF checkpoints on CUDA or the CPU, with continuous batching."""

from __future__ import annotations

from collections.abc import Mapping

from backends.base import Backend
from backends.registry import HF_CHECKPOINT, BackendSpec, BackendTarget

NAME = "torch"


def _precisions(kind: str, num_parameters: int, details: Mapping[str, object]) -> list[str]:
    """bf16 where the silicon has it; else fp16 on a GPU and fp32 on the CPU (bf16 without native support is
    slower, so it is only the fallback when fp32 does not fit)."""
    bf16 = bool(details.get("bf16"))
    simulated = bool(details.get("simulated"))
    if kind == "gpu":
        return ["bf16"] if bf16 else (["fp32"] if simulated else ["fp16"])
    if kind == "cpu":
        return ["bf16"] if bf16 else ["fp32", "bf16"]
    return []


def _create(target: BackendTarget) -> Backend:
    from backends.torch.backend import TorchBackend

    if target.device_kind == "gpu" and not target.simulated:
        return TorchBackend(target.model_path, device=f"cuda:{target.device_index}", dtype=target.precision)
    return TorchBackend(
        target.model_path,
        device="cpu",
        dtype=target.precision,
        simulated_device=target.device_kind if target.simulated and target.device_kind != "cpu" else None,
    )


SPEC = BackendSpec(
    name=NAME,
    devices=("gpu", "cpu"),
    format=HF_CHECKPOINT,
    factory=_create,
    precisions=_precisions,
    priority={"gpu": 0, "cpu": 1},
)
