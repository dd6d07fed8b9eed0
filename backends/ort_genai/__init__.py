"""onnxruntime-genai backend: exported ONNX folders on an execution provider (CPU, QNN, OpenVINO, ...)."""

from __future__ import annotations

from collections.abc import Mapping

from backends.base import Backend
from backends.registry import ONNX_GENAI, BackendSpec, BackendTarget

NAME = "onnxruntime-genai"
CPU_MAX_PARAMETERS = 4_000_000_000
"""On the CPU, the int4 export is the fastest path measured here; above this the export's fp32 pass needs
more RAM than a CPU box is assumed to have, so torch serves larger models."""


def _precisions(kind: str, num_parameters: int, details: Mapping[str, object]) -> list[str]:
    if kind == "npu":
        return ["int4"]  # the scheduler's NPU size ceiling applies to every runtime
    if kind == "cpu":
        return ["int4"] if num_parameters <= CPU_MAX_PARAMETERS else []
    return []


def _create(target: BackendTarget) -> Backend:
    from backends.ort_genai.backend import OrtGenaiBackend

    return OrtGenaiBackend(target.model_path, device=target.device_kind, simulated=target.simulated)


SPEC = BackendSpec(
    name=NAME,
    devices=("npu", "cpu"),
    format=ONNX_GENAI,
    factory=_create,
    precisions=_precisions,
    priority={"npu": 0, "cpu": 0},
)
