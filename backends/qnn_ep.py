"""Qualcomm QNN (HTP) execution provider: registration, devices and provider options, in one place.

onnxruntime-qnn ships QNN as a *plugin* execution provider: it must be registered with onnxruntime
(`ort.register_execution_provider_library`) before a session can name it, and separately with
onnxruntime-genai (`og.register_execution_provider_library`) before a genai_config naming `qnn` loads
(otherwise: "QNN execution provider is not supported in this build"). `register()` does both, once
per process, under a lock. On x86-64 the wheel's HTP backend is Qualcomm's emulator (a correctness
and compile check, never a speed figure); on aarch64 / Windows on Snapdragon it is the real NPU.

Typical loader of an exported npu folder (the transformer graphs are precompiled `_ctx.onnx` files
whose genai_config already names `qnn` with the options below; embeddings and lm_head run on the CPU):

    from backends import qnn_ep
    qnn_ep.register()                       # raises QnnUnavailable (with the install command) if missing
    config = og.Config(str(folder))         # no overlay needed; overlay only to change threads etc.
    model = og.Model(config)

This module never imports `plugin` (backends stay independent of the exporter).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

EP_NAME = "QNNExecutionProvider"  # onnxruntime's name
GENAI_PROVIDER = "qnn"  # genai_config's name
INSTALL_HINT = "pip install onnxruntime-qnn==2.7.0"
SOC_MODEL = "60"  # needed for int4 block weights and for GroupQueryAttention to finalize on HTP
OP_AFFINITY_FILE = "op_affinity.json"
# QNN compiles GroupQueryAttention but filters it off HTP unless pinned there.
OP_AFFINITY: dict[str, Any] = {"op_type": {"GroupQueryAttention": "htp"}}

_lock = threading.Lock()
_registered = {"ort": False, "genai": False}


class QnnUnavailable(RuntimeError):
    """onnxruntime-qnn is not installed (or cannot be registered); the message names the fix."""


def is_installed() -> bool:
    """True when the onnxruntime-qnn package is importable (no registration, no device probe)."""
    return importlib.util.find_spec("onnxruntime_qnn") is not None


def library_path() -> str:
    """Path of the QNN plugin library; raises QnnUnavailable with the install command."""
    try:
        import onnxruntime_qnn
    except ImportError as e:
        raise QnnUnavailable(f"the QNN execution provider is not installed: {INSTALL_HINT}") from e
    return str(onnxruntime_qnn.get_library_path())


def _register_once(kind: str, register: Any, path: str) -> None:
    try:
        register(EP_NAME, path)
    except Exception as e:  # a second registration by someone else is fine; anything else is not
        if "already" not in str(e).lower():
            raise QnnUnavailable(f"registering {EP_NAME} with {kind} failed: {e}") from e
    _registered[kind] = True


def register(genai: bool = True) -> None:
    """Register the QNN plugin with onnxruntime (and onnxruntime-genai unless genai=False). Idempotent."""
    if _registered["ort"] and (_registered["genai"] or not genai):
        return
    path = library_path()
    with _lock:
        if not _registered["ort"]:
            import onnxruntime as ort

            _register_once("ort", ort.register_execution_provider_library, path)
        if genai and not _registered["genai"]:
            import onnxruntime_genai as og

            _register_once("genai", og.register_execution_provider_library, path)


def ep_devices() -> list[Any]:
    """onnxruntime's OrtEpDevice entries of the QNN provider (registers it first). Empty if none is found."""
    import onnxruntime as ort

    register(genai=False)
    return [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]


def is_emulated() -> bool:
    """True when the HTP is Qualcomm's x86-64 emulator (the PyPI wheel's backend on Intel/AMD hosts)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return False
    if sys.platform == "win32" and "arm" in os.environ.get("PROCESSOR_IDENTIFIER", "").lower():
        return False  # x64 Python on Windows on Snapdragon still reaches the real NPU
    return machine in ("x86_64", "amd64", "x64", "i686")


def htp_kind() -> str:
    """ "emulated" or "real": the label every report of the NPU carries."""
    return "emulated" if is_emulated() else "real"


def htp_provider_options(op_affinity: str | Path | None = None) -> dict[str, str]:
    """QNN provider options for the HTP backend.

    `op_affinity` (path of an op_affinity.json, see write_op_affinity) is needed only when compiling a QDQ
    graph; loading the precompiled `_ctx.onnx` files does not read it.
    """
    options = {
        "backend_type": "htp",
        "soc_model": SOC_MODEL,
        "enable_htp_fp16_precision": "1",
        # the most thorough graph finalization: the default mode fails real-size w8a16 layers with
        # QNN_COMMON_ERROR_MEM_ALLOC (1002) on the emulated HTP; mode 3 compiles them
        "htp_graph_finalization_optimization_mode": "3",
    }
    if op_affinity is not None:
        options["op_affinity"] = str(Path(op_affinity).resolve())
    return options


def write_op_affinity(folder: str | Path) -> Path:
    """Write op_affinity.json into `folder` (pins GroupQueryAttention to HTP); returns its path."""
    path = Path(folder) / OP_AFFINITY_FILE
    path.write_text(json.dumps(OP_AFFINITY), encoding="utf-8")
    return path


def describe() -> dict[str, Any]:
    """What a device report needs: installed, version, kind (emulated/real), devices found (never raises)."""
    info: dict[str, Any] = {"installed": is_installed(), "kind": htp_kind(), "provider": EP_NAME, "devices": []}
    if not info["installed"]:
        info["reason"] = f"onnxruntime-qnn is not installed ({INSTALL_HINT})"
        return info
    try:
        import onnxruntime_qnn

        info["version"] = getattr(onnxruntime_qnn, "__version__", "unknown")
        info["devices"] = [
            {"vendor": d.ep_vendor, "type": str(d.device.type).rsplit(".", 1)[-1], "metadata": dict(d.ep_metadata)}
            for d in ep_devices()
        ]
    except Exception as e:  # a broken install is reported, not raised
        info["reason"] = f"QNN could not be registered: {e}"
    return info
