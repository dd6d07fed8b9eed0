"""Turn a placement into a loaded backend: export for the NPU path, the HF checkpoint for the GPU path."""

from __future__ import annotations

import logging

from backends.base import Backend, BackendError
from plugin.devices import DeviceInfo
from plugin.models import ResolvedModel
from plugin.scheduler import Placement

log = logging.getLogger(__name__)


def default_backend_factory(model: ResolvedModel, placement: Placement, device: DeviceInfo) -> Backend:
    """Build (not load) the backend a placement asks for. Exports go through the export cache."""
    if placement.backend == "onnxruntime-genai":
        from backends.ort_genai import OrtGenaiBackend
        from plugin.export import export

        exported = export(model.path, target=device.kind, precision=placement.precision)
        return OrtGenaiBackend(exported.path, device=device.kind, simulated=device.simulated)
    if placement.backend == "torch":
        from backends.torch_backend import TorchBackend

        if device.kind == "gpu" and not device.simulated:
            return TorchBackend(model.path, device=f"cuda:{device.index}")
        dtype = "fp32" if placement.precision == "fp32" else placement.precision
        return TorchBackend(
            model.path,
            device="cpu",
            dtype=dtype,
            simulated_device="gpu" if device.kind == "gpu" else None,
        )
    raise BackendError(f"no backend named {placement.backend!r}; known: 'onnxruntime-genai', 'torch'")
