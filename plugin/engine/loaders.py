"""Turn a placement into a built (not yet loaded) backend: prepare the model in the format the runtime
consumes, then call the runtime's registered factory. No per-runtime branches: runtimes declare their
format and factory in backends/registry.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from backends import registry
from backends.base import Backend, BackendError
from backends.registry import HF_CHECKPOINT, ONNX_GENAI, BackendTarget
from plugin.engine.devices import DeviceInfo
from plugin.engine.scheduler import Placement
from plugin.models.resolve import ResolvedModel

log = logging.getLogger(__name__)


def export_target(device: DeviceInfo) -> str:
    """Which export a device gets. A simulated device runs on the CPU provider, so it gets the CPU export."""
    return "cpu" if device.simulated else device.kind


def prepare(model: ResolvedModel, model_format: str, device: DeviceInfo, precision: str) -> Path:
    """The model folder in `model_format`, converting (through the export cache) when needed."""
    if model_format == HF_CHECKPOINT:
        return Path(model.path)
    if model_format == ONNX_GENAI:
        from plugin.convert import export

        target = export_target(device)
        # The reference, not the folder: `accelserve export default` and serving "default" share one cache entry.
        # An NPU package's parity check runs for many minutes on an emulator; serving builds it without and
        # `accelserve export --target npu` measures it (a later export with parity adds it to the same entry).
        return export(model.ref, target=target, precision=precision, parity=target != "npu").path
    raise BackendError(f"no converter for model format {model_format!r}; known: {HF_CHECKPOINT!r}, {ONNX_GENAI!r}")


def default_backend_factory(model: ResolvedModel, placement: Placement, device: DeviceInfo) -> Backend:
    """Build (not load) the backend a placement asks for."""
    spec = registry.get(placement.backend)
    path = prepare(model, spec.format, device, placement.precision)
    target = BackendTarget(path, device.kind, device.index, placement.precision, simulated=device.simulated)
    return spec.factory(target)
