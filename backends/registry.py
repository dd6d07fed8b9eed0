"""The plugin seam: runtimes are found through Python entry points, the way vLLM finds platform plugins.

A package adds a runtime by declaring, in its pyproject.toml,

    [project.entry-points."accelserve.backends"]
    myruntime = "my_package:SPEC"

where `SPEC` is a `BackendSpec`: the device kinds it runs on, the precisions it offers per kind (given the
model's size), the model format it consumes, and a factory that builds (not loads) a `Backend`. The two
built-in runtimes register the same way (this project's own pyproject.toml), so the scheduler has no
per-runtime branches: it asks every registered spec what it can do.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from backends.base import Backend, BackendError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "accelserve.backends"

HF_CHECKPOINT = "hf-checkpoint"
"""A Hugging Face model folder (config.json + weights + tokenizer files)."""
ONNX_GENAI = "onnx-genai"
"""An onnxruntime-genai folder written by `plugin.export` (genai_config.json, ONNX graphs, manifest)."""


@dataclass(frozen=True)
class BackendTarget:
    """What a factory is asked to build: a prepared model folder for one device at one precision."""

    model_path: Path  # in the spec's format: an HF checkpoint or an export folder
    device_kind: str  # "gpu" | "npu" | "cpu"
    device_index: int
    precision: str
    simulated: bool = False  # a made-up device: run on the CPU and say so


@dataclass(frozen=True)
class BackendSpec:
    """What a runtime declares about itself. `precisions(kind, num_parameters, details)` lists what it can
    serve a model of that size with on that device kind, preferred first (empty: it cannot);
    `details` are the device's facts (e.g. {"bf16": True})."""

    name: str
    devices: tuple[str, ...]
    format: str
    factory: Callable[[BackendTarget], Backend]
    precisions: Callable[[str, int, Mapping[str, object]], list[str]]
    priority: Mapping[str, int] = field(default_factory=dict)  # per device kind; lower is preferred

    def rank(self, kind: str) -> int:
        return self.priority.get(kind, 100)


_lock = threading.Lock()
_specs: dict[str, BackendSpec] | None = None


def registered() -> dict[str, BackendSpec]:
    """Every runtime installed in this environment, by name (entry points are read once per process)."""
    global _specs
    with _lock:
        if _specs is None:
            _specs = _load()
        return dict(_specs)


def refresh() -> dict[str, BackendSpec]:
    """Read the entry points again (after installing a backend package into the running process's path)."""
    global _specs
    with _lock:
        _specs = None
    return registered()


def get(name: str) -> BackendSpec:
    specs = registered()
    if name not in specs:
        raise BackendError(
            f"no backend named {name!r} is installed (have: {', '.join(sorted(specs)) or 'none'}); "
            f"install a package that registers it under the {ENTRY_POINT_GROUP!r} entry point group"
        )
    return specs[name]


def _load() -> dict[str, BackendSpec]:
    specs: dict[str, BackendSpec] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = ep.load()
        except Exception as exc:  # one broken plugin must not take the built-in runtimes down with it
            log.warning("backend plugin %r (%s) failed to import and is ignored: %s", ep.name, ep.value, exc)
            continue
        if not isinstance(spec, BackendSpec):
            log.warning("backend plugin %r (%s) is not a BackendSpec and is ignored", ep.name, ep.value)
            continue
        if spec.name in specs:
            log.warning("backend %r is registered twice; keeping the first (%s)", spec.name, ep.value)
            continue
        specs[spec.name] = spec
    if not specs:
        log.warning(
            "no backends are registered under %r: install this package (pip install -e .) so its entry points exist",
            ENTRY_POINT_GROUP,
        )
    return specs
