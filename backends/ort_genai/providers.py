"""Execution-provider choice for onnxruntime-genai: which providers to try, in what order, and loading with fallback.

A device kind ("npu", "gpu", "cpu") maps to a preference list of execution providers. Providers that this
machine cannot run are skipped (onnxruntime-genai's build flags *and* onnxruntime's provider/device listing
must both say yes: onnxruntime-genai reports QNN and OpenVINO "available" on a plain CPU wheel, so its flags
alone are not enough). The rest are tried in order; the first that loads the model wins, and every skip or
failure before it is recorded so callers can explain a fallback instead of hiding it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from backends.base import BackendError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProviderSpec:
    """One execution provider as onnxruntime-genai and onnxruntime name it."""

    key: str  # our short name: "qnn", "openvino", ...
    genai_name: str  # what og.Config.append_provider accepts
    ort_name: str  # onnxruntime's provider name, reported as "the provider that runs"
    runs_on: str  # the device kind this provider really executes on: "npu" | "gpu" | "cpu"
    manifest_keys: tuple[str, ...]  # the export manifest's "providers" entries on whether it loads there
    options: dict[str, str] = field(default_factory=dict)  # provider options set through og.Config
    genai_flag: str | None = None  # og.is_<x>_available, when the build exposes one
    config_name: str = ""  # the key genai_config.json's provider_options use (the exporter writes it)

    @property
    def emulated(self) -> bool:
        """QNN's HTP backend on an x86-64 host is Qualcomm's emulator: real compiler and numerics, CPU speed."""
        if self.key != "qnn":
            return False
        from backends import qnn_ep

        return qnn_ep.is_emulated()


# DirectML is in the NPU list as the Windows fallback, but it runs on the default adapter, a GPU: it is
# reported as "gpu" so a DirectML placement is never called NPU.
PROVIDERS: dict[str, ProviderSpec] = {
    "qnn": ProviderSpec(
        "qnn", "QNN", "QNNExecutionProvider", "npu", ("qnn",), {"backend_type": "htp"}, "is_qnn_available", "qnn"
    ),
    "openvino": ProviderSpec(
        "openvino",
        "OpenVINO",
        "OpenVINOExecutionProvider",
        "npu",
        ("openvino:npu", "openvino"),
        {"device_type": "NPU"},
        "is_openvino_available",
        "OpenVINO",
    ),
    "vitisai": ProviderSpec(
        "vitisai", "VitisAI", "VitisAIExecutionProvider", "npu", ("vitisai",), config_name="VitisAI"
    ),
    "dml": ProviderSpec("dml", "DML", "DmlExecutionProvider", "gpu", ("dml",), {}, "is_dml_available", "dml"),
    "cuda": ProviderSpec("cuda", "cuda", "CUDAExecutionProvider", "gpu", ("cuda",), {}, "is_cuda_available", "cuda"),
    "cpu": ProviderSpec("cpu", "cpu", "CPUExecutionProvider", "cpu", ("cpu",), config_name="cpu"),
}
"""The one table of execution providers: the exporter (plugin/convert/targets.py) reads its names from here."""

PREFERENCE: dict[str, tuple[str, ...]] = {
    "npu": ("qnn", "openvino", "vitisai", "dml", "cpu"),
    "gpu": ("cuda", "dml", "cpu"),
    "cpu": ("cpu",),
}

# Accepted spellings for a provider override, e.g. "QNNExecutionProvider", "QNN", "qnn".
_ALIASES: dict[str, str] = {}
_ALIASES["directml"] = "dml"
for _spec in PROVIDERS.values():
    for _name in (_spec.key, _spec.genai_name, _spec.ort_name, _spec.ort_name.removesuffix("ExecutionProvider")):
        _ALIASES[_name.lower()] = _spec.key


def resolve_provider(name: str) -> ProviderSpec:
    """Map any common spelling of a provider to its spec, or raise naming the valid choices."""
    key = _ALIASES.get(str(name).strip().lower())
    if key is None:
        raise ValueError(f"Unknown execution provider {name!r}: choose from {sorted(PROVIDERS)} (or their ORT names)")
    return PROVIDERS[key]


def preference_for(device: str, providers: Sequence[str] | None = None) -> list[ProviderSpec]:
    """The providers to try for a device kind, best first; an explicit `providers` list overrides the order."""
    if device not in PREFERENCE:
        raise ValueError(f"Unknown device {device!r}: use one of {sorted(PREFERENCE)}")
    if providers is not None:
        if isinstance(providers, str):
            providers = [providers]
        if not providers:
            raise ValueError("providers is empty: pass None for the default order, or e.g. ['qnn', 'cpu']")
        specs = {}
        for p in providers:
            spec = resolve_provider(p)
            specs.setdefault(spec.key, spec)
        return list(specs.values())
    return [PROVIDERS[k] for k in PREFERENCE[device]]


def _ort_listing() -> set[str]:
    """onnxruntime's view of usable providers: built-in ones plus plugin EP devices."""
    import onnxruntime as ort

    names = set(ort.get_available_providers())
    get_ep_devices = getattr(ort, "get_ep_devices", None)
    if get_ep_devices is not None:
        try:
            names.update(d.ep_name for d in get_ep_devices())
        except Exception as exc:  # a broken plugin EP must not hide the built-in ones
            log.warning("onnxruntime.get_ep_devices() failed (%s); using get_available_providers() only", exc)
    return names


def unavailable_reason(spec: ProviderSpec) -> str | None:
    """Why this machine cannot run `spec`, or None when it might (only a load attempt can tell for sure)."""
    if spec.key == "cpu":
        return None
    if spec.key == "qnn":
        from backends import qnn_ep

        if not qnn_ep.is_installed():
            return f"onnxruntime-qnn is not installed ({qnn_ep.INSTALL_HINT})"
        try:
            qnn_ep.register()
        except qnn_ep.QnnUnavailable as exc:
            return str(exc)
    import onnxruntime_genai as og

    if spec.genai_flag is not None:
        flag = getattr(og, spec.genai_flag, None)
        if flag is not None and not flag():
            return f"onnxruntime-genai reports {spec.genai_flag}() == False (this build lacks {spec.genai_name})"
    listed = _ort_listing()
    if spec.ort_name not in listed:
        return f"onnxruntime does not list {spec.ort_name} (available: {', '.join(sorted(listed))})"
    return None


def export_support(model_dir: Path) -> dict[str, tuple[bool, str]]:
    """What the export's manifest.json says about each provider: manifest key (lower case) -> (loads, reason)."""
    path = model_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8")).get("providers") or {}
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return {}
    return {
        str(k).lower(): (bool(v.get("loads", True)), str(v.get("reason", "")))
        for k, v in report.items()
        if isinstance(v, dict)
    }


def export_provider_options(model_dir: Path) -> dict[str, dict[str, str]]:
    """Provider options the export wrote into genai_config.json, by our provider key."""
    try:
        config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    entries = config.get("model", {}).get("decoder", {}).get("session_options", {}).get("provider_options") or []
    out: dict[str, dict[str, str]] = {}
    for entry in entries:
        for name, options in entry.items() if isinstance(entry, dict) else ():
            key = _ALIASES.get(str(name).lower())
            if key is not None and isinstance(options, dict):
                out[key] = {str(k): str(v) for k, v in options.items()}
    return out


def build_config(model_dir: Path, spec: ProviderSpec, num_threads: int | None = None) -> Any:
    """An og.Config for `model_dir` that runs on exactly `spec` (plus onnxruntime's CPU fallback for its nodes).

    Options are our defaults for the provider, overridden by what the export itself wrote for it.
    """
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if is_pipeline(model_dir):
        # An HTP package: its precompiled graphs name QNN in their own session options (embeddings and lm_head
        # stay on the CPU by design). It loads as written, on QNN only: clearing the top-level providers would
        # not move those graphs, so any other provider would be reported while QNN ran.
        if spec.key != "qnn":
            raise BackendError(
                f"{model_dir} is a static-shape package compiled for Qualcomm's HTP: it runs on the QNN provider "
                f"only, not on {spec.ort_name}. For this device, export the model for it (e.g. --target cpu)"
            )
        from backends import qnn_ep

        qnn_ep.register()
        return config
    if spec.key == "qnn":
        from backends import qnn_ep

        qnn_ep.register()
    config.clear_providers()
    if spec.key != "cpu":
        config.append_provider(spec.genai_name)
        options = {**spec.options, **export_provider_options(model_dir).get(spec.key, {})}
        for k, v in options.items():
            config.set_provider_option(spec.genai_name, k, v)
    session = session_threads(spec, num_threads)
    if session:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    return config


def is_pipeline(model_dir: Path) -> bool:
    """True for a decoder-pipeline export (the static-shape NPU package), whose graphs carry their providers."""
    try:
        config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("model", {}).get("type") == "decoder-pipeline"


def session_threads(spec: ProviderSpec, num_threads: int | None) -> dict[str, int]:
    """Thread settings to overlay on the export's session options ({} = leave onnxruntime-genai's default).

    On the CPU provider, None means one intra-op thread per physical core. Left unset, onnxruntime-genai
    0.18 decodes the default int4 export 1.5x slower on 2 cores (137 vs 224 tok/s, 32 new tokens).
    Accelerator providers keep their default: there the threads only run the nodes they fall back on.
    """
    if num_threads is None and spec.key == "cpu":
        num_threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if num_threads is None:
        return {}
    return {"intra_op_num_threads": int(num_threads), "inter_op_num_threads": 1}


@dataclass
class LoadResult:
    model: Any  # og.Model
    spec: ProviderSpec
    attempts: list[tuple[str, str]]  # (ort provider name, why it was skipped or failed), in order tried


def viable_candidates(
    model_dir: Path, candidates: Sequence[ProviderSpec], *, explicit: bool, attempts: list[tuple[str, str]]
) -> Iterator[ProviderSpec]:
    """The candidates worth a load attempt, in order; each one skipped is recorded in `attempts` with why.

    Default preference lists skip providers this machine lacks and providers the export's manifest says
    it cannot run on; an explicit list is tried as given (the caller asked for it, and a load attempt
    gives the most precise error)."""
    support = export_support(model_dir)
    for spec in candidates:
        if not explicit:
            reason = unavailable_reason(spec)
            key = next((k for k in spec.manifest_keys if k in support), None)
            loads, why = support[key] if key else (True, "")
            if reason is None and not loads:
                reason = f"the export cannot run there ({why or 'per its manifest.json'})"
            if reason is not None:
                attempts.append((spec.ort_name, f"skipped: {reason}"))
                log.debug("skip %s: %s", spec.ort_name, reason)
                continue
        yield spec


def load_with_fallback(
    model_dir: Path,
    candidates: Sequence[ProviderSpec],
    *,
    explicit: bool,
    num_threads: int | None = None,
    load: Callable[[Any], Any] | None = None,
) -> LoadResult:
    """Load `model_dir` with the first provider in `candidates` that works (see `viable_candidates`)."""
    if load is None:
        import onnxruntime_genai as og

        load = og.Model
    attempts: list[tuple[str, str]] = []
    for spec in viable_candidates(model_dir, candidates, explicit=explicit, attempts=attempts):
        try:
            model = load(build_config(model_dir, spec, num_threads))
        except Exception as exc:
            attempts.append((spec.ort_name, f"load failed: {exc}".strip()))
            log.info("loading %s with %s failed: %s", model_dir, spec.ort_name, exc)
            continue
        if attempts:
            log.warning(
                "%s runs on %s after: %s", model_dir, spec.ort_name, "; ".join(f"{p}: {e}" for p, e in attempts)
            )
        return LoadResult(model, spec, attempts)
    tried = "; ".join(f"{p}: {e}" for p, e in attempts) or "no providers to try"
    error = BackendError(
        f"Could not load {model_dir} with any execution provider ({tried}). "
        "Fix: include 'cpu' in providers, or install the onnxruntime build for your accelerator."
    )
    error.attempts = attempts  # type: ignore[attr-defined]
    raise error
