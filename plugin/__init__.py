"""accelserve: accelerator-aware serving for Hugging Face LLMs.

    from plugin import Engine
    engine = Engine.from_pretrained("default", policy="auto")
    reply = engine.chat([{"role": "user", "content": "Hi"}], max_new_tokens=64)
    reply.text, reply.placement.device, reply.placement.reason, reply.metrics.tokens_per_s
    for chunk in engine.chat(messages, stream=True): print(chunk.text, end="")
    async for chunk in engine.achat(messages): ...

    import plugin
    plugin.export("default", target="npu", precision="int4")   # static QDQ pipeline compiled for QNN HTP (w4a16)
    plugin.discover_devices()                                  # GPUs, NPUs, CPU (+ simulated ones)
    plugin.finetune("default", data="chats.jsonl", output="tuned")  # LoRA, merged: a folder export/serve take

Names are imported on first use, so `import plugin` stays fast (torch loads only when needed).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Engine": "plugin.engine.engine",
    "ChatReply": "plugin.engine.engine",
    "ChatChunk": "plugin.engine.engine",
    "RequestMetrics": "plugin.engine.engine",
    "EngineError": "plugin.engine.engine",
    "Overloaded": "plugin.engine.engine",
    "NoDeviceAvailable": "plugin.engine.engine",
    "ExportedModel": "plugin.convert",
    "ExportError": "plugin.convert",
    "resolve_model": "plugin.models.resolve",
    "ResolvedModel": "plugin.models.resolve",
    "ModelSourceError": "plugin.models.resolve",
    "ModelProfile": "backends.profile",
    "DeviceInfo": "plugin.engine.devices",
    "discover_devices": "plugin.engine.devices",
    "Placement": "plugin.engine.scheduler",
    "PlacementError": "plugin.engine.scheduler",
    "place": "plugin.engine.scheduler",
    "GenerationRequest": "backends.base",
    "FinetuneResult": "plugin.finetune",
    "FinetuneError": "plugin.finetune",
    "SamplingParams": "backends.base",
}

__all__ = [
    "ChatChunk",
    "ChatReply",
    "DeviceInfo",
    "Engine",
    "EngineError",
    "ExportError",
    "ExportedModel",
    "FinetuneError",
    "FinetuneResult",
    "GenerationRequest",
    "ModelProfile",
    "ModelSourceError",
    "NoDeviceAvailable",
    "Overloaded",
    "Placement",
    "PlacementError",
    "RequestMetrics",
    "ResolvedModel",
    "SamplingParams",
    "discover_devices",
    "export",
    "finetune",
    "place",
    "resolve_model",
]

if TYPE_CHECKING:
    from backends.base import GenerationRequest, SamplingParams
    from backends.profile import ModelProfile
    from plugin.convert import ExportedModel, ExportError
    from plugin.engine.devices import DeviceInfo, discover_devices
    from plugin.engine.engine import (
        ChatChunk,
        ChatReply,
        Engine,
        EngineError,
        NoDeviceAvailable,
        Overloaded,
        RequestMetrics,
    )
    from plugin.engine.scheduler import Placement, PlacementError, place
    from plugin.finetune import FinetuneError, FinetuneResult
    from plugin.models.resolve import ModelSourceError, ResolvedModel, resolve_model


def export(model_ref: str | Path, target: str = "npu", precision: str = "int4", **options: Any) -> ExportedModel:
    """Convert a model for onnxruntime-genai on `target` (npu: the QNN HTP pipeline; cpu; gpu), through the cache.

    The whole pipeline and its options are plugin.convert.export (output, force, block_size, graph,
    context_length, window, ...).
    """
    from plugin.convert import export as convert_export

    return convert_export(model_ref, target, precision, **options)


def finetune(model_ref: str | Path, data: str | Path, output: str | Path, **options: Any) -> FinetuneResult:
    """LoRA-fine-tune a model on chat data (.jsonl) into a merged HF checkpoint folder `output`.

    Options and defaults are plugin.finetune.finetune's (eval_data, eval_fraction, settings, device, overwrite,
    steps=..., learning_rate=...): a real GPU trains in bf16, else the CPU in fp32; never an NPU.
    """
    from plugin.finetune import finetune as run_finetune

    return run_finetune(model_ref, data, output, **options)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'plugin' has no attribute {name!r}")
