"""What this machine can run a model on: GPUs, NPUs and the CPU, plus simulated devices.

Sources, most specific first:
- GPUs: `torch.cuda` (name, total memory, compute capability, bf16 support); NVML (`pynvml`), when
  importable, adds free memory and the driver version without creating a CUDA context.
- NPUs: `onnxruntime.get_ep_devices()` lists every (execution provider, hardware device) pair with a
  hardware type CPU/GPU/NPU; each NPU it reports becomes one device, with all providers that reach it.
  When a provider is installed but does not list devices (older provider packages), an NPU is claimed
  only with hardware evidence: QNN on an ARM64 machine (Snapdragon), OpenVINO when OpenVINO itself
  lists an "NPU" device, VitisAI (it ships only with AMD's Ryzen AI NPU software). The `backends` of an
  NPU include "onnxruntime-genai" only when onnxruntime-genai can drive that provider
  (`og.is_qnn_available()`, `og.is_openvino_available()`); note those report what the library was
  built with, not hardware, so they never create a device on their own.
- CPU: always present. Model name and ISA flags (AVX2, AVX-512, AMX, NEON, ...) from /proc/cpuinfo on
  Linux, cores and memory from psutil.

Simulated devices
-----------------
Set ``ACCELSERVE_SIMULATE`` (or pass ``simulate=``) to add devices that do not exist, to exercise
placement on a machine without accelerators::

    ACCELSERVE_SIMULATE="gpu:24GB,npu:8GB"

The syntax is a comma-separated list of ``<kind>:<memory>``: kind is ``gpu`` or ``npu``; memory is a
positive number with a unit, ``MB``/``GB``/``TB`` (powers of 1000) or ``MiB``/``GiB``/``TiB`` (powers
of 1024), case-insensitive, e.g. ``1.5GB`` or ``512MiB``. Repeat a kind for several devices. Simulated
devices are added after the real ones (their index continues the real ones'), are named
"Simulated GPU (runs on CPU)" and carry ``simulated=True`` and ``providers=("CPUExecutionProvider",)``:
they execute on the CPU and nothing reports them as anything else. A simulated GPU is served by torch,
a simulated NPU by onnxruntime-genai.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

log = logging.getLogger(__name__)

SIMULATE_ENV = "ACCELSERVE_SIMULATE"
DeviceKind = Literal["cpu", "gpu", "npu"]
KIND_ORDER = {"gpu": 0, "npu": 1, "cpu": 2}

CPU_PROVIDER = "CPUExecutionProvider"
NPU_PROVIDERS = ("QNNExecutionProvider", "OpenVINOExecutionProvider", "VitisAIExecutionProvider")


class DeviceSpecError(ValueError):
    """A simulated-device specification could not be parsed."""


@dataclass(frozen=True)
class DeviceInfo:
    """One device a backend can run on. `simulated` devices execute on the CPU."""

    kind: DeviceKind
    name: str
    memory_bytes: int
    backends: tuple[str, ...]  # runtimes that can use it: "torch", "onnxruntime-genai"
    providers: tuple[str, ...]  # onnxruntime execution providers that reach it
    simulated: bool = False
    index: int = 0
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)
    emulated: bool = False  # a vendor's NPU runtime emulating the NPU on this CPU (QNN HTP on x86-64)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "backends": list(self.backends),
            "providers": list(self.providers),
            "simulated": self.simulated,
            "emulated": self.emulated,
            "index": self.index,
            "details": dict(self.details),
        }


# ---- simulation -----------------------------------------------------------------------------------

_UNITS = {"mb": 10**6, "gb": 10**9, "tb": 10**12, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIM_ITEM = re.compile(r"^(?P<kind>[a-z]+):(?P<num>\d+(?:\.\d+)?)(?P<unit>[a-z]+)$")
SIMULATE_SYNTAX = (
    f"expected {SIMULATE_ENV}=<kind>:<memory>[,<kind>:<memory>...] with kind gpu or npu and memory like "
    "24GB, 1.5GB or 512MiB (units MB/GB/TB or MiB/GiB/TiB), e.g. 'gpu:24GB,npu:8GB'"
)


def parse_simulation(spec: str) -> list[DeviceInfo]:
    """Parse "gpu:24GB,npu:8GB" into simulated devices (indexes from 0 per kind). Empty spec: none."""
    if not spec or not spec.strip():
        return []
    out: list[DeviceInfo] = []
    counts: dict[str, int] = {}
    for raw in spec.split(","):
        item = raw.strip().lower().replace(" ", "")
        if not item:
            raise DeviceSpecError(f"empty entry in simulated devices {spec!r}; {SIMULATE_SYNTAX}")
        m = _SIM_ITEM.match(item)
        if m is None:
            raise DeviceSpecError(f"cannot parse simulated device {raw.strip()!r} in {spec!r}; {SIMULATE_SYNTAX}")
        kind, unit, text = m["kind"], m["unit"], raw.strip()
        if kind == "cpu":
            raise DeviceSpecError(f"{text!r}: the CPU is always present and cannot be simulated; {SIMULATE_SYNTAX}")
        if kind not in ("gpu", "npu"):
            raise DeviceSpecError(f"unknown device kind {kind!r} in {text!r}; {SIMULATE_SYNTAX}")
        if unit not in _UNITS:
            raise DeviceSpecError(f"unknown memory unit {unit!r} in {text!r}; {SIMULATE_SYNTAX}")
        memory = int(float(m["num"]) * _UNITS[unit])
        if memory < 10**6:
            raise DeviceSpecError(f"{text!r}: memory must be at least 1MB; {SIMULATE_SYNTAX}")
        index = counts.get(kind, 0)
        counts[kind] = index + 1
        out.append(_simulated_device(kind, memory, index, text))
    return out


def _simulated_device(kind: str, memory: int, index: int, spec: str) -> DeviceInfo:
    return DeviceInfo(
        kind=kind,  # type: ignore[arg-type]
        name=f"Simulated {kind.upper()} (runs on CPU)",
        memory_bytes=memory,
        backends=("torch",) if kind == "gpu" else ("onnxruntime-genai",),
        providers=(CPU_PROVIDER,),
        simulated=True,
        index=index,
        details={"runs_on": "cpu", "spec": spec},
    )


# ---- discovery ------------------------------------------------------------------------------------


def _import(name: str) -> ModuleType | None:
    """Import an optional runtime; None when it is not installed (tests monkeypatch this)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        log.debug("%s is not installed; skipping its devices", name)
        return None


def discover_devices(simulate: str | None = None) -> list[DeviceInfo]:
    """Real GPUs, NPUs and the CPU, then simulated devices (`simulate`, default $ACCELSERVE_SIMULATE)."""
    spec = os.environ.get(SIMULATE_ENV, "") if simulate is None else simulate
    simulated = parse_simulation(spec)  # fail fast on a bad spec, before probing hardware
    cpu = discover_cpu()
    devices = [
        *discover_gpus(_import("torch"), _import("pynvml")),
        *discover_npus(_import("onnxruntime")),
        *discover_qnn_emulator(_qnn_module(), _import("onnxruntime_genai")),
    ]
    devices.append(_with_registered_runtimes(cpu))
    next_index = {k: sum(d.kind == k for d in devices) for k in KIND_ORDER}
    for d in simulated:
        extra = dict(d.details)
        extra["host_physical_cores"] = cpu.details.get("physical_cores")
        if d.kind == "gpu":  # torch on this CPU: bf16 only pays off with native bf16 instructions
            extra["bf16"] = bool(cpu.details.get("bf16"))
        devices.append(replace(d, index=next_index[d.kind], details=extra))
        next_index[d.kind] += 1
    return sorted(devices, key=lambda d: (KIND_ORDER[d.kind], d.simulated, d.index))


def _with_registered_runtimes(cpu: DeviceInfo) -> DeviceInfo:
    """Every installed runtime that runs on CPUs reaches this one (plugins included, backends/registry.py)."""
    from backends import registry

    extra = [s.name for s in registry.registered().values() if "cpu" in s.devices and s.name not in cpu.backends]
    return replace(cpu, backends=(*cpu.backends, *extra)) if extra else cpu


def discover_gpus(torch: Any, pynvml: Any = None) -> list[DeviceInfo]:
    """CUDA (or ROCm) GPUs visible to torch."""
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        count = torch.cuda.device_count()
    except Exception as e:  # a broken driver must not stop CPU serving
        log.warning("torch.cuda could not be queried (%s); no GPU will be used", e)
        return []
    nvml = _nvml_memory(pynvml)
    hip = getattr(getattr(torch, "version", None), "hip", None)
    out = []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        major, minor = int(getattr(props, "major", 0)), int(getattr(props, "minor", 0))
        uuid = str(getattr(props, "uuid", "") or "")
        details: dict[str, Any] = {
            "capability": f"{major}.{minor}",
            # bf16 tensor cores arrive with Ampere (sm_80); ROCm builds answer through is_bf16_supported.
            "bf16": major >= 8 if not hip else _bf16_supported(torch),
            "multiprocessors": int(getattr(props, "multi_processor_count", 0)),
            "runtime": f"hip {hip}" if hip else f"cuda {getattr(torch.version, 'cuda', None)}",
        }
        if uuid:
            details["uuid"] = uuid
        # NVML numbers GPUs in PCI order, torch may not: match by uuid, by index only when there is one GPU
        mem = nvml.get(uuid.removeprefix("GPU-")) or (nvml.get(0) if count == 1 and len(nvml) == 2 else None)
        if mem:
            details.update(mem)
        out.append(
            DeviceInfo(
                kind="gpu",
                name=str(props.name),
                memory_bytes=int(props.total_memory),
                backends=("torch",),
                providers=("ROCMExecutionProvider",) if hip else ("CUDAExecutionProvider",),
                index=i,
                details=details,
            )
        )
    return out


def _bf16_supported(torch: Any) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported())
    except Exception as e:
        log.debug("torch.cuda.is_bf16_supported failed: %s", e)
        return False


def _nvml_memory(pynvml: Any) -> dict[Any, dict[str, Any]]:
    """Free memory per GPU from NVML, keyed by both uuid and index; {} when NVML is unavailable."""
    if pynvml is None:
        return {}
    out: dict[Any, dict[str, Any]] = {}
    try:
        pynvml.nvmlInit()
    except Exception as e:
        log.debug("NVML unavailable (%s); free GPU memory not reported", e)
        return {}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            entry = {"free_bytes": int(info.free), "driver": _text(driver)}
            out[_text(uuid).removeprefix("GPU-")] = entry
            out[i] = entry
    except Exception as e:
        log.warning("NVML query failed (%s); free GPU memory not reported", e)
        return {}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as e:
            log.debug("nvmlShutdown failed: %s", e)
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _og_supports(og: Any, provider: str) -> bool:
    """Can onnxruntime-genai drive this provider (build support, not hardware)?"""
    probe = {"QNNExecutionProvider": "is_qnn_available", "OpenVINOExecutionProvider": "is_openvino_available"}
    fn = getattr(og, probe.get(provider, ""), None) if og is not None else None
    if fn is None:
        return False
    try:
        return bool(fn())
    except Exception as e:
        log.debug("onnxruntime-genai %s() failed: %s", probe[provider], e)
        return False


def discover_npus(ort: Any, og: Any = None, openvino: Any = None, machine: str | None = None) -> list[DeviceInfo]:
    """NPUs reachable through onnxruntime execution providers."""
    if ort is None:
        return []
    if og is None:
        og = _import("onnxruntime_genai")
    total_memory = _system_memory()[0]
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for ep in _ep_devices(ort):
        hw = ep.device
        if _hw_type(hw) != "NPU":
            continue
        key = (_text(getattr(hw, "vendor", "")), getattr(hw, "vendor_id", 0), getattr(hw, "device_id", 0))
        meta = dict(getattr(hw, "metadata", {}) or {})
        entry = found.setdefault(
            key,
            {
                "name": meta.get("Description") or f"{key[0] or 'Unknown'} NPU",
                "providers": [],
                "details": {"vendor": key[0], "vendor_id": key[1], "device_id": key[2], "detected_by": "ep_devices"},
            },
        )
        if ep.ep_name not in entry["providers"]:
            entry["providers"].append(ep.ep_name)
            entry["details"].setdefault("ep_vendors", {})[ep.ep_name] = _text(getattr(ep, "ep_vendor", ""))

    listed = {p for e in found.values() for p in e["providers"]}
    try:
        available = set(ort.get_available_providers())
    except Exception as e:
        log.warning("onnxruntime.get_available_providers failed: %s", e)
        available = set()
    machine = (machine or platform.machine()).lower()
    for provider in NPU_PROVIDERS:
        if provider not in available or provider in listed:
            continue
        entry = _npu_from_provider(provider, machine, openvino)
        if entry is not None:
            found[(provider,)] = entry

    out = []
    for i, entry in enumerate(found.values()):
        providers = tuple(entry["providers"])
        genai = [p for p in providers if _og_supports(og, p)]
        details = dict(entry["details"])
        details["shared_memory"] = True  # NPUs in laptops/SoCs use system RAM
        details["genai_providers"] = genai
        if not genai:
            details["note"] = (
                "onnxruntime-genai cannot drive " + ", ".join(providers) + "; install a build with that provider"
            )
        out.append(
            DeviceInfo(
                kind="npu",
                name=entry["name"],
                memory_bytes=total_memory,
                backends=("onnxruntime-genai",) if genai else (),
                providers=providers,
                index=i,
                details=details,
            )
        )
    return out


def _qnn_module() -> Any:
    """backends.qnn_ep when onnxruntime-qnn is installed, else None."""
    if _import("onnxruntime_qnn") is None:
        return None
    from backends import qnn_ep

    return qnn_ep


def discover_qnn_emulator(qnn: Any, og: Any) -> list[DeviceInfo]:
    """Qualcomm's HTP emulator (onnxruntime-qnn on x86-64) as an NPU labelled `emulated`.

    The QNN plugin lists its emulated HTP with hardware type CPU, so `discover_npus` does not take it; it
    is a real NPU compiler and runtime executing on this CPU: it proves an export compiles and computes
    the right numbers on HTP, and it is orders of magnitude slower than the CPU provider. On a Snapdragon
    machine the same plugin lists hardware type NPU and `discover_npus` reports the real device.
    """
    if qnn is None or not qnn.is_emulated():
        return []
    try:
        qnn.register()
        listed = qnn.ep_devices()
    except Exception as e:  # a broken plugin is reported, never fatal to discovery
        log.warning("the QNN execution provider could not be registered (%s); no emulated NPU", e)
        return []
    if not listed:
        return []
    genai = _og_supports(og, "QNNExecutionProvider")
    details: dict[str, Any] = {
        "detected_by": "onnxruntime-qnn plugin",
        "htp": "emulated",
        "note": "Qualcomm's HTP compiler and runtime executing on this CPU: proves compilation and numerics, "
        "not speed or power",
        "genai_providers": ["QNNExecutionProvider"] if genai else [],
    }
    return [
        DeviceInfo(
            kind="npu",
            name="Qualcomm HTP (emulated on x86-64)",
            memory_bytes=_system_memory()[0],
            backends=("onnxruntime-genai",) if genai else (),
            providers=("QNNExecutionProvider",),
            index=0,
            details=details,
            emulated=True,
        )
    ]


def _ep_devices(ort: Any) -> list[Any]:
    fn = getattr(ort, "get_ep_devices", None)
    if fn is None:
        log.debug("onnxruntime %s has no get_ep_devices", getattr(ort, "__version__", "?"))
        return []
    try:
        return list(fn())
    except Exception as e:
        log.warning("onnxruntime.get_ep_devices failed: %s", e)
        return []


def _hw_type(hw: Any) -> str:
    t = getattr(hw, "type", None)
    return str(getattr(t, "name", t)).upper().rsplit(".", 1)[-1]


def _npu_from_provider(provider: str, machine: str, openvino: Any) -> dict[str, Any] | None:
    """An NPU for an installed provider that does not list devices, only with hardware evidence."""
    detail = {"detected_by": f"provider {provider} installed"}
    if provider == "QNNExecutionProvider":
        if machine not in ("arm64", "aarch64"):
            log.debug("QNN provider present on %s: no Hexagon NPU on this architecture", machine)
            return None
        return {"name": "Qualcomm Hexagon NPU", "providers": [provider], "details": detail}
    if provider == "OpenVINOExecutionProvider":
        ov = openvino if openvino is not None else _import("openvino")
        if ov is None:
            log.info("OpenVINO provider present but the openvino package is not, so an Intel NPU cannot be confirmed")
            return None
        try:
            core = ov.Core()
            if "NPU" not in core.available_devices:
                return None
            name = str(core.get_property("NPU", "FULL_DEVICE_NAME"))
        except Exception as e:
            log.warning("OpenVINO device query failed (%s); no Intel NPU assumed", e)
            return None
        return {"name": name or "Intel NPU", "providers": [provider], "details": {**detail, "openvino_device": "NPU"}}
    if provider == "VitisAIExecutionProvider":
        return {"name": "AMD Ryzen AI NPU", "providers": [provider], "details": detail}
    return None


def _system_memory() -> tuple[int, int]:
    """(total, available) bytes of system RAM."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


# ISA flags that matter for inference kernels, as /proc/cpuinfo spells them -> display name.
_ISA_FLAGS = {
    "sse4_2": "SSE4.2",
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx_vnni": "AVX-VNNI",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "asimd": "NEON",
    "asimdhp": "FP16",
    "asimddp": "DOTPROD",
    "i8mm": "I8MM",
    "bf16": "BF16",
    "sve": "SVE",
    "sve2": "SVE2",
}
_BF16_ISA = {"AVX512-BF16", "AMX-BF16", "BF16"}


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(model name, ISA display names) from /proc/cpuinfo text (x86 `flags` or ARM `Features`)."""
    name = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not name and key in ("model name", "hardware", "processor") and not value.strip().isdigit():
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    isa = [display for flag, display in _ISA_FLAGS.items() if flag in flags]
    return name, isa


def discover_cpu(cpuinfo_path: str | Path = "/proc/cpuinfo") -> DeviceInfo:
    """The CPU: always present, runs both backends."""
    import psutil

    name, isa = "", []
    path = Path(cpuinfo_path)
    if path.exists():
        try:
            name, isa = parse_cpuinfo(path.read_text(errors="replace"))
        except OSError as e:
            log.warning("could not read %s (%s); CPU features unknown", path, e)
    machine = platform.machine().lower()
    if not isa and machine in ("arm64", "aarch64"):
        isa = ["NEON"]  # mandatory in ARMv8-A
    total, available = _system_memory()
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return DeviceInfo(
        kind="cpu",
        name=name or platform.processor() or machine or "CPU",
        memory_bytes=total,
        backends=("torch", "onnxruntime-genai"),
        providers=(CPU_PROVIDER,),
        index=0,
        details={
            "physical_cores": int(physical),
            "logical_cores": int(psutil.cpu_count() or physical),
            "isa": isa,
            "bf16": bool(_BF16_ISA.intersection(isa)),
            "available_bytes": available,
            "arch": machine,
        },
    )


# ---- presentation ---------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """Decimal units, as memory is sold: 8.0 GB, 86 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def _details_text(d: DeviceInfo) -> str:
    x = d.details
    parts = []
    if d.simulated:
        parts.append("simulated: executes on the CPU")
    if d.emulated:
        parts.append("emulated: the vendor's NPU runtime executing on the CPU (numerics, not speed)")
    if d.kind == "cpu":
        parts.append(f"{x.get('physical_cores', '?')} cores / {x.get('logical_cores', '?')} threads")
        if x.get("isa"):
            parts.append(" ".join(x["isa"]))
    if d.kind == "gpu" and not d.simulated:
        parts.append(f"capability {x.get('capability', '?')}" + (", bf16" if x.get("bf16") else ""))
        if "free_bytes" in x:
            parts.append(f"{format_bytes(x['free_bytes'])} free")
    if d.kind == "npu" and not d.simulated:
        parts.append(str(x.get("detected_by", "")))
        if x.get("note"):
            parts.append(str(x["note"]))
    return "; ".join(p for p in parts if p)


def format_devices_table(devices: Sequence[DeviceInfo]) -> Any:
    """A rich Table of the inventory (rich is imported here so the core never needs it)."""
    from rich.table import Table

    table = Table(title="Devices", title_justify="left")
    for col in ("id", "name", "memory", "backends", "providers"):
        table.add_column(col, no_wrap=col in ("id", "memory", "backends"), overflow="fold")
    table.add_column("details", ratio=1, overflow="fold")
    for d in devices:
        table.add_row(
            d.id,
            d.name,
            format_bytes(d.memory_bytes),
            "\n".join(d.backends) or "-",
            "\n".join(p.removesuffix("ExecutionProvider") for p in d.providers) or "-",
            _details_text(d),
        )
    return table


def devices_to_json(devices: Sequence[DeviceInfo]) -> list[dict[str, Any]]:
    return [d.to_dict() for d in devices]
