"""Predicted prefill and decode speed per (device, model, precision), learned from served requests.

Before any measurement, rates come from a device profile and the model's size:

- decode is memory-bound: each new token streams all weights once, so
  ``step_s = weight_bytes / bandwidth + step_overhead_s`` and ``decode tok/s = 1 / step_s``;
- prefill is compute-bound: ``prefill tok/s = compute_flops / (2 * num_parameters)``.

Profile defaults (effective figures, well under the datasheet peaks, because HF-style generation
and dynamic-shape ONNX graphs do not reach peak):

- CPU: 4 GB/s of weight streaming and 30 GFLOP/s per physical core (capped at 60 GB/s, a dual-channel
  DDR5 desktop's achievable bandwidth), 1 ms per step. A prior, deliberately rough: the first
  measured request replaces it (what this machine really does is in benchmarks/RESULTS.md).
- GPU: 600 GB/s and 40 TFLOP/s effective, 12 ms per step. Datasheets: NVIDIA A100 has 1,555 GB/s and
  312 TFLOP/s dense BF16, an RTX 4090 1,008 GB/s; transformers' eager `generate` reaches roughly
  half the bandwidth and pays kernel-launch and Python overhead on every step, which dominates for
  small models.
- NPU: 40 GB/s and 4 TFLOP/s effective, 5 ms per step. Microsoft's Phi Silica announcement (a 3.3B
  4-bit model on the Snapdragon X Hexagon NPU, whose SoC has 135 GB/s LPDDR5x and a 45 TOPS NPU)
  reports about 650 tokens/s prompt processing and about 20 tokens/s generation at about 1.5 W:
  1.9 GB / 40 GB/s + 5 ms ≈ 20 tok/s, and 4 TFLOP/s / 6.6 GFLOP ≈ 600 tok/s.
- Simulated devices run on the CPU, so they get the CPU's profile (and its watts).
- An emulated NPU (Qualcomm's HTP emulator on x86-64) gets the emulator's own, very slow profile.

Power (used by the energy policy): CPU 8 W per busy physical core, capped at 65 W (desktop TDPs are
35–125 W, laptop 15–45 W); GPU 250 W (A100 PCIe board power; an RTX 4090 is rated 450 W); NPU 2 W
(Phi Silica's ~1.5 W plus memory traffic).

Measured requests update the rates with an exponential moving average (``alpha`` weight on the new
sample; the first sample replaces the prior); `save()` persists them as JSON in
``accelserve_home()/costmodel.json`` with an atomic replace (the engine calls it on a worker thread),
so the next run starts from what this machine really did. All methods are thread-safe.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.profile import ModelProfile
from plugin.engine.devices import DeviceInfo

log = logging.getLogger(__name__)

FILE_NAME = "costmodel.json"
SCHEMA_VERSION = 1
ANY_PRECISION = "*"


@dataclass(frozen=True)
class DeviceProfile:
    """How fast and how hungry one kind of device is, before anything was measured."""

    kind: str
    bandwidth_bytes_s: float  # effective weight streaming during decode
    compute_flops_s: float  # effective FLOP/s during prefill
    step_overhead_s: float  # fixed cost per decode step (launches, dispatch, sampling)
    watts: float  # power while busy
    batch_slowdown: float  # extra step time per additional concurrent sequence, as a fraction of one step


GPU_PROFILE = DeviceProfile("gpu", 600e9, 40e12, 0.012, 250.0, 0.02)
NPU_PROFILE = DeviceProfile("npu", 40e9, 4e12, 0.005, 2.0, 0.6)
EMULATED_NPU_PROFILE = DeviceProfile("npu", 20e6, 0.26e9, 0.05, 8.0, 1.0)
"""Qualcomm's HTP emulator on x86-64 (docs/npu.md): about 0.26 GFLOP/s and ~4 s per token for a 135M-param
model (its ~80 MB of weights at ~20 MB/s). Never a speed figure for a real NPU; it keeps `auto` off it."""
CPU_BANDWIDTH_PER_CORE = 4e9
CPU_BANDWIDTH_CAP = 60e9
CPU_FLOPS_PER_CORE = 30e9
CPU_STEP_OVERHEAD_S = 0.001
CPU_WATTS_PER_CORE = 8.0
CPU_WATTS_CAP = 65.0
CPU_BATCH_SLOWDOWN = 0.5


def cpu_profile(physical_cores: int) -> DeviceProfile:
    cores = max(1, int(physical_cores))
    return DeviceProfile(
        "cpu",
        min(CPU_BANDWIDTH_PER_CORE * cores, CPU_BANDWIDTH_CAP),
        CPU_FLOPS_PER_CORE * cores,
        CPU_STEP_OVERHEAD_S,
        min(CPU_WATTS_PER_CORE * cores, CPU_WATTS_CAP),
        CPU_BATCH_SLOWDOWN,
    )


def _host_cores() -> int:
    import psutil

    return int(psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)


def device_profile(device: DeviceInfo) -> DeviceProfile:
    """The prior profile of a device. Simulated devices run on the CPU and get its profile."""
    if device.kind == "cpu" or device.simulated:
        cores = device.details.get("physical_cores") or device.details.get("host_physical_cores") or _host_cores()
        return cpu_profile(int(cores))
    if device.emulated:
        return EMULATED_NPU_PROFILE
    return GPU_PROFILE if device.kind == "gpu" else NPU_PROFILE


@dataclass(frozen=True)
class Rates:
    prefill_tps: float
    decode_tps: float
    prefill_samples: int = 0
    decode_samples: int = 0

    @property
    def source(self) -> str:
        if self.prefill_samples or self.decode_samples:
            return f"measured (decode n={self.decode_samples}, prefill n={self.prefill_samples})"
        return "device profile"


def prior_rates(device: DeviceInfo, model: ModelProfile, precision: str) -> Rates:
    p = device_profile(device)
    step = model.weight_bytes(precision) / p.bandwidth_bytes_s + p.step_overhead_s
    prefill = p.compute_flops_s / max(2.0 * model.num_parameters, 1.0)
    return Rates(prefill_tps=prefill, decode_tps=1.0 / step)


def _device_key(device: DeviceInfo | str, simulated: bool | None) -> tuple[str, str]:
    """(key, plain id): simulated devices are stored apart from real ones with the same id."""
    if isinstance(device, str):
        return (f"sim-{device}" if simulated else device), device
    sim = device.simulated if simulated is None else simulated
    return (f"sim-{device.id}" if sim else device.id), device.id


def _valid(x: float | None) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x) and x > 0


class CostModel:
    """Rates per (device, model, precision): profile priors, refined by measured requests."""

    def __init__(self, path: Path | str | None = None, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (got {alpha!r}); it is the weight of each new measurement")
        self.path = Path(path) if path is not None else None
        self.alpha = alpha
        self._lock = threading.Lock()
        # device key -> model name -> precision -> {"prefill_tps", "decode_tps", "*_samples", "updated"}
        self._entries: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        self._dirty = False

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def default_path(cls) -> Path:
        from plugin.home import accelserve_home

        return accelserve_home() / FILE_NAME

    @classmethod
    def load_default(cls, alpha: float = 0.3) -> CostModel:
        """The cost model persisted in the accelserve home (empty if none yet)."""
        return cls.load(cls.default_path(), alpha=alpha)

    @classmethod
    def load(cls, path: Path | str, alpha: float = 0.3) -> CostModel:
        """Read `path` if it exists; an unreadable file is logged and ignored (the priors still work)."""
        model = cls(path, alpha=alpha)
        p = Path(path)
        if not p.exists():
            return model
        try:
            data = json.loads(p.read_text())
            if data.get("version") != SCHEMA_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError(f"unexpected schema (version {data.get('version')!r}, want {SCHEMA_VERSION})")
            model._entries = data["entries"]
        except (OSError, ValueError, AttributeError) as e:
            log.warning("ignoring measured rates in %s (%s); starting from device profiles", p, e)
        return model

    # ---- queries ---------------------------------------------------------------------------------
    def rates(self, device: DeviceInfo, model: ModelProfile, precision: str) -> Rates:
        """Measured rates where known (per rate), else the device profile's prior."""
        prior = prior_rates(device, model, precision)
        entry = self._lookup(device, model.name, precision)
        if entry is None:
            return prior
        n_pre, n_dec = int(entry.get("prefill_samples", 0)), int(entry.get("decode_samples", 0))
        return Rates(
            prefill_tps=float(entry["prefill_tps"]) if n_pre else prior.prefill_tps,
            decode_tps=float(entry["decode_tps"]) if n_dec else prior.decode_tps,
            prefill_samples=n_pre,
            decode_samples=n_dec,
        )

    def watts(self, device: DeviceInfo) -> float:
        return device_profile(device).watts

    def batch_slowdown(self, device: DeviceInfo) -> float:
        return device_profile(device).batch_slowdown

    def _lookup(self, device: DeviceInfo, model: str, precision: str) -> dict[str, Any] | None:
        key, plain = _device_key(device, None)
        with self._lock:
            for k in dict.fromkeys((key, plain)):
                per_model = self._entries.get(k, {}).get(model, {})
                for prec in (precision, ANY_PRECISION):
                    if prec in per_model:
                        return dict(per_model[prec])
        return None

    # ---- updates ---------------------------------------------------------------------------------
    def observe(
        self,
        device: DeviceInfo | str,
        model: ModelProfile,
        *,
        prefill_tps: float | None = None,
        decode_tps: float | None = None,
        precision: str | None = None,
        simulated: bool | None = None,
    ) -> None:
        """Fold one served request's measured rates in (memory only; `save` persists). Invalid rates are skipped.

        Pass the DeviceInfo (or `simulated` and `precision` with a device id) so rates stay apart per
        precision and simulated devices never pollute a real device's history.
        """
        samples = {"prefill": prefill_tps if _valid(prefill_tps) else None}
        samples["decode"] = decode_tps if _valid(decode_tps) else None
        if all(v is None for v in samples.values()):
            log.debug("no usable rate to record for %s (prefill=%r, decode=%r)", device, prefill_tps, decode_tps)
            return
        key, _ = _device_key(device, simulated)
        with self._lock:
            entry = (
                self._entries.setdefault(key, {}).setdefault(model.name, {}).setdefault(precision or ANY_PRECISION, {})
            )
            for name, value in samples.items():
                if value is None:
                    continue
                n = int(entry.get(f"{name}_samples", 0))
                old = entry.get(f"{name}_tps")
                ema = float(value) if not n or old is None else self.alpha * value + (1 - self.alpha) * old
                entry[f"{name}_tps"] = ema
                entry[f"{name}_samples"] = n + 1
            entry.setdefault("prefill_tps", None)
            entry.setdefault("decode_tps", None)
            entry["updated"] = time.time()
            self._dirty = True

    def save(self) -> bool:
        """Persist the rates if anything changed since the last save; True when it wrote the file.

        File I/O, so the engine calls it on a worker thread, never on its event loop.
        """
        with self._lock:  # held while writing, so an older snapshot never overwrites a newer one
            if self.path is None or not self._dirty:
                return False
            self._write(self._snapshot_locked())
            self._dirty = False
            return True

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "alpha": self.alpha, "entries": json.loads(json.dumps(self._entries))}

    def _write(self, data: Mapping[str, Any]) -> None:
        """Atomic: write a temp file in the same folder, then rename over the old one."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
