"""Execution providers per target, and what each one demands of a model.

An export folder is a plain Optimum decoder graph (dynamic batch/sequence shapes, a KV cache that grows
by concatenation) at one precision. onnxruntime-genai runs one execution provider per model, named in
`genai_config.json` under `model.decoder.session_options.provider_options` (empty list = CPU); the
backend may swap it at load time through `og.Config.clear_providers()/append_provider()`.

What each provider needs (onnxruntime, OpenVINO, Ryzen AI documentation):

- QNN (Qualcomm Hexagon HTP): a QDQ graph quantized to 8/16-bit (uint8/uint16 activations, int8/int4
  QDQ weights) with STATIC shapes; the HTP backend does not run the com.microsoft MatMulNBits op, and
  dynamic sequence/KV shapes cannot be compiled. Qualcomm's LLM recipe splits the model (embedding and
  lm_head on CPU) and compiles fixed (1,64) prefill and (1,1) decode graphs into a context binary.
  -> our dynamic MatMulNBits/float exports cannot load on QNN HTP; options given here are what a
     prepared model would use: backend_type=htp, htp_performance_mode, context cache.
- OpenVINO on an Intel NPU: symmetric int4 weights with group size 128 or channel-wise, static shapes
  (the maximum prompt length is fixed when the NPU compiles the model). OpenVINO's CPU/GPU devices take
  dynamic graphs. -> our export loads with device_type CPU or GPU; device_type NPU is refused.
- VitisAI (AMD Ryzen AI NPU): AWQ int4 models prepared by AMD's Quark/Olive flow, and the provider is
  not in the public onnxruntime-genai wheels. -> refused.
- DirectML (Windows GPUs): fp16 and int4 MatMulNBits; fp32 works. No 8-bit MatMulNBits kernel.
- CUDA: fp16, int4 and int8 MatMulNBits, fp32.
- CPU: fp32, int8 and int4 MatMulNBits; fp16 graphs load and run, slower than fp32 (the CPU target does
  not build fp16, but a GPU export still loads on the CPU floor).

The paragraphs above describe the Optimum/fused graphs (targets cpu and gpu, or graph="plain"/"fused").
target="npu" builds what QNN HTP needs instead (graph "qnn", plugin/convert/qnn/): a static-shape QDQ
decoder pipeline whose transformer graphs are compiled HTP binaries; `qnn_providers_report` says where
that folder loads. The manifest's `providers` section records, per provider, whether a folder can load
there and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.ort_genai.providers import PROVIDERS as PROVIDER_TABLE
from backends.ort_genai.providers import resolve_provider
from plugin.convert.errors import ExportError

TARGETS = ("npu", "cpu", "gpu")
PRECISIONS = ("int4", "int8", "fp16", "fp32")

# Provider names as onnxruntime-genai's genai_config spells them, from the backends' one provider table.
PROVIDERS = tuple(spec.config_name for spec in PROVIDER_TABLE.values())

# Which precisions each target builds (fp32 is always allowed: it is the reference).
TARGET_PRECISIONS: dict[str, tuple[str, ...]] = {
    "npu": ("int4", "int8", "fp32"),
    "cpu": ("int4", "int8", "fp32"),
    "gpu": ("fp16", "int4", "int8", "fp32"),
}

# Providers each target may name, best first; the CPU is the floor for every target.
TARGET_PROVIDERS: dict[str, tuple[str, ...]] = {
    "npu": ("qnn", "OpenVINO", "VitisAI", "cpu"),
    "gpu": ("cuda", "dml", "OpenVINO", "cpu"),
    "cpu": ("cpu", "OpenVINO"),
}
# OpenVINO device per target.
_OPENVINO_DEVICE = {"npu": "NPU", "gpu": "GPU", "cpu": "CPU"}

_PROVIDER_OPTIONS: dict[str, dict[str, str]] = {
    "cpu": {},
    "cuda": {"enable_cuda_graph": "0"},  # graph capture needs past_present_share_buffer (static KV)
    "dml": {},
    # What a QNN-prepared model runs with: the HTP backend at burst clock, optimized graph finalization.
    "qnn": {"backend_type": "htp", "htp_performance_mode": "burst", "htp_graph_finalization_optimization_mode": "3"},
    "OpenVINO": {"device_type": "CPU"},
    "VitisAI": {},
}


@dataclass(frozen=True)
class ProviderSupport:
    provider: str
    loads: bool
    reason: str


def provider_support(provider: str, precision: str, device: str | None = None) -> ProviderSupport:
    """Can an Optimum-graph export at `precision` load on `provider` (OpenVINO: on `device`)? With why."""
    if provider == "qnn":
        return ProviderSupport(
            provider,
            False,
            "QNN HTP runs static-shape QDQ 8/16-bit graphs; this export has dynamic KV shapes and "
            + ("MatMulNBits, which HTP does not run" if precision in ("int4", "int8") else "float weights"),
        )
    if provider == "VitisAI":
        return ProviderSupport(
            provider,
            False,
            "VitisAI needs AWQ int4 models prepared by AMD's Ryzen AI tools, and the provider is not in the "
            "public onnxruntime-genai wheels",
        )
    if provider == "OpenVINO":
        if (device or "CPU") == "NPU":
            return ProviderSupport(
                provider,
                False,
                "OpenVINO's NPU device compiles static shapes with symmetric int4 group 128 or channel-wise "
                "weights; this export has dynamic shapes (OpenVINO's CPU and GPU devices can load it)",
            )
        return ProviderSupport(provider, True, f"OpenVINO's {device or 'CPU'} device reads dynamic ONNX graphs")
    if provider == "dml":
        if precision == "int8":
            return ProviderSupport(provider, False, "DirectML has no 8-bit MatMulNBits kernel; use int4 or fp16")
        return ProviderSupport(provider, True, "DirectML runs fp16/fp32 and int4 MatMulNBits")
    if provider == "cuda":
        return ProviderSupport(provider, True, "CUDA runs fp16/fp32 and MatMulNBits int4/int8")
    if provider == "cpu":
        if precision == "fp16":
            return ProviderSupport(
                provider, True, "the CPU provider runs fp16 graphs, slower than fp32 (a fallback only)"
            )
        return ProviderSupport(provider, True, "the CPU provider runs fp32 and MatMulNBits int4/int8")
    raise ExportError(f"unknown execution provider {provider!r}; known: {', '.join(PROVIDERS)}")


def check_target(target: str, precision: str) -> None:
    """Refuse a (target, precision) pair before any work, with the fix in the message."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision not in TARGET_PRECISIONS[target]:
        why = {
            "npu": "no NPU provider runs fp16 graphs; use int4 (or int8)",
            "cpu": "fp16 is slower than fp32 on the CPU; use fp32, int8 or int4",
        }.get(target, "")
        raise ExportError(
            f"precision {precision!r} is not built for target {target!r} "
            f"(choose {', '.join(TARGET_PRECISIONS[target])}): {why}"
        )


def canonical_provider(provider: str) -> str:
    """Any spelling of a provider ("QNNExecutionProvider", "QNN", "qnn", "DirectML") -> genai_config's name."""
    try:
        return resolve_provider(provider).config_name
    except ValueError as e:
        raise ExportError(f"unknown execution provider {provider!r}; known: {', '.join(PROVIDERS)}") from e


def provider_options_for(target: str, provider: str | None = None, precision: str = "int4") -> list[dict[str, Any]]:
    """genai_config `provider_options` entries for `target` (optionally a named provider).

    Returns [] for the CPU (onnxruntime-genai's default; also what provider=None gives: the CPU floor, the
    backend appends a present accelerator's provider at load time). Raises ExportError when the named
    provider cannot run this export format, rather than return options for a config that would fail to load.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if provider is None:
        return []
    canonical = canonical_provider(provider)
    if canonical not in TARGET_PROVIDERS[target]:
        raise ExportError(
            f"provider {canonical!r} does not serve target {target!r}; it takes {', '.join(TARGET_PROVIDERS[target])}"
        )
    device = _OPENVINO_DEVICE[target] if canonical == "OpenVINO" else None
    support = provider_support(canonical, precision, device)
    if not support.loads:
        raise ExportError(f"this export cannot load on {canonical}{f' {device}' if device else ''}: {support.reason}")
    if canonical == "cpu":
        return []
    options = dict(_PROVIDER_OPTIONS[canonical])
    if device:
        options["device_type"] = device
    return [{canonical: options}]


def providers_report(precision: str) -> dict[str, dict[str, Any]]:
    """Per provider (OpenVINO per device): can this folder load there and why (goes into manifest.json)."""
    report: dict[str, dict[str, Any]] = {}
    for p in PROVIDERS:
        devices = ("NPU", "GPU", "CPU") if p == "OpenVINO" else (None,)
        for d in devices:
            s = provider_support(p, precision, d)
            report[f"{p}:{d}" if d else p] = {"loads": s.loads, "reason": s.reason}
    return report


def qnn_providers_report() -> dict[str, dict[str, Any]]:
    """Per provider for an HTP pipeline (target npu, graph qnn): where this folder loads and why."""
    qnn = (
        "the context/iterator graphs are compiled QNN HTP binaries (EP-context); embeddings and lm_head run on the CPU"
    )
    static = "a static-shape QDQ decoder-pipeline compiled for QNN HTP"
    report = {
        "qnn": {"loads": True, "reason": qnn},
        "cpu": {
            "loads": True,
            "reason": "the QDQ graphs beside the binaries (*.qdq.onnx) run on the CPU provider when the "
            "config's context/iterator filenames point at them (slow; a fallback and a parity reference)",
        },
        "VitisAI": provider_support("VitisAI", "int4").__dict__,
        "OpenVINO:NPU": {"loads": False, "reason": f"{static}; OpenVINO's NPU compiles its own IR with its driver"},
    }
    for p in ("cuda", "dml"):
        report[p] = {"loads": False, "reason": f"{static}; GPU providers take the gpu target's export"}
    for k in report.values():
        k.pop("provider", None)
    return report
