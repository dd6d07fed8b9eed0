"""Shared helpers for the benchmark scripts: statistics, the machine they ran on, JSON and PNG output, energy.

Every number a benchmark publishes is a median over several runs with its min and max beside it, and
every result file carries the machine description (CPU model, cores, memory, library versions, load
average), because numbers from a shared 2-core machine mean little without the conditions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
QUESTIONS = (  # one chat prompt per concurrent stream, shared by the backend benchmarks
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "What is 12 times 7? Explain your reasoning step by step.",
    "Give me a fun fact about octopuses.",
    "Translate 'good morning' into Spanish, French and German.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "What does HTTP stand for?",
    "Describe a cat to someone who has never seen one.",
    "What is the boiling point of water in Fahrenheit?",
    "Name the planets of the solar system.",
    "What is a haiku?",
    "Tell me a joke about computers.",
)
BUSY_LOAD = 1.5  # 1-minute load average above which a 2-core machine is "busy" and numbers are noisy
VERSIONED = (
    "accelserve",
    "torch",
    "transformers",
    "onnxruntime",
    "onnxruntime-genai",
    "optimum",
    "optimum-onnx",
    "numpy",
    "matplotlib",
    "llama-cpp-python",
)


# ---- statistics -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Median, min and max of repeated measurements (NaN when there were none)."""

    median: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fmt(self, digits: int = 1) -> str:
        """'12.3 (11.0-13.1)': median with the range, for tables."""
        if self.n == 0 or math.isnan(self.median):
            return "-"
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}-{self.max:.{digits}f})"


def summarize(values: Iterable[float | None]) -> Stats:
    """Stats over the finite values; None and NaN (a run that produced no rate) are left out."""
    xs = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not xs:
        return Stats(math.nan, math.nan, math.nan, 0)
    mid = len(xs) // 2
    median = xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
    return Stats(median, xs[0], xs[-1], len(xs))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) like numpy's default; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100] (got {q!r})")
    xs = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(ours: float | None, bare: float | None) -> float:
    """ours / bare, NaN when either is missing or bare is zero."""
    if ours is None or bare is None or not math.isfinite(ours) or not math.isfinite(bare) or bare == 0:
        return math.nan
    return ours / bare


# ---- the machine ------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall through to platform
    return platform.processor() or platform.machine()


def package_versions(names: Iterable[str] = VERSIONED) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was when they were."""
    import psutil

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpus": _gpu_names(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return info


def _gpu_names() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def busy_note(threshold: float = BUSY_LOAD) -> str | None:
    """A warning when the 1-minute load average says other work shares the cores; None when quiet."""
    if not hasattr(os, "getloadavg"):
        return None
    one = os.getloadavg()[0]
    if one <= threshold:
        return None
    return (
        f"the machine is busy (1-minute load average {one:.2f} > {threshold} on {os.cpu_count()} cores): "
        "other processes share the CPU, so these numbers are noisy and likely pessimistic"
    )


# ---- memory ----------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: VmHWM from /proc/self/status, the high-water mark of this process image. Not ru_maxrss: it
    carries over across exec, so a worker started from a parent that had torch imported would report
    the parent's size. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass  # no procfs: fall back to getrusage
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# ---- output ----------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/Infinity; null means "not measured"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON atomically (temp file + rename); NaN becomes null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(
            "plots need matplotlib, from the bench extra: pip install -e '.[bench]' (or pass --no-plots)"
        ) from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_bars(
    path: Path,
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[Stats]],
    ylabel: str,
    note: str = "",
) -> Path:
    """Grouped bars (one group per label, one bar per series) at the median, with min-max error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * max(1, len(series)) * 0.6 + 3), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (name, stats) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        med = [s.median if s.n else 0.0 for s in stats]
        lo = [max(0.0, s.median - s.min) if s.n else 0.0 for s in stats]
        hi = [max(0.0, s.max - s.median) if s.n else 0.0 for s in stats]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    _finish(fig, ax, note)
    return _save(fig, plt, path)


def plot_lines(
    path: Path,
    title: str,
    xs: Sequence[float],
    series: Mapping[str, Sequence[Stats]],
    xlabel: str,
    ylabel: str,
    note: str = "",
) -> Path:
    """One line per series through the medians, with a min-max band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, stats in series.items():
        med = [s.median for s in stats]
        ax.plot(xs, med, marker="o", label=name)
        ax.fill_between(xs, [s.min for s in stats], [s.max for s in stats], alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(list(xs))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _finish(fig, ax, note)
    return _save(fig, plt, path)


def _finish(fig: Any, ax: Any, note: str) -> None:
    ax.grid(axis="y", alpha=0.3)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgray", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- energy ----------------------------------------------------------------------------------------------

RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class EnergyReading:
    """Joules over an interval and where they came from ('measured: ...' or 'estimated: ...')."""

    joules: float
    source: str


class EnergyMeter:
    """Measured energy where the hardware reports it: RAPL package counters, NVML GPU counters.

    `start()` then `stop()` returns the measured joules per source, or {} when nothing is readable
    (callers then estimate from device-profile watts and say so).
    """

    def __init__(self, rapl_root: Path = RAPL_ROOT) -> None:
        self.rapl_root = Path(rapl_root)
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def rapl_files(self) -> list[Path]:
        """Readable top-level package energy counters (intel-rapl:N/energy_uj, not the sub-zones)."""
        if not self.rapl_root.is_dir():
            return []
        out = []
        for zone in sorted(self.rapl_root.glob("*rapl:*")):
            f = zone / "energy_uj"
            if zone.name.count(":") == 1 and f.is_file() and os.access(f, os.R_OK):
                out.append(f)
        return out

    def _read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for f in self.rapl_files():
            try:
                values[f"rapl:{f.parent.name}"] = int(f.read_text().strip()) / 1e6
            except (OSError, ValueError) as e:
                log.debug("RAPL counter %s unreadable: %s", f, e)
        values.update(_nvml_joules())
        return values

    def start(self) -> None:
        self._start = self._read()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, EnergyReading]:
        end = self._read()
        out = {}
        for key, j0 in self._start.items():
            if key not in end:
                continue
            joules = end[key] - j0
            if joules < 0 and key.startswith("rapl:"):  # the counter wrapped; its range is in max_energy_range_uj
                joules += _rapl_range(self.rapl_root / key.split(":", 1)[1])
            out[key] = EnergyReading(joules, f"measured ({'RAPL package counter' if 'rapl' in key else 'NVML'})")
        return out


def _rapl_range(zone: Path) -> float:
    try:
        return int((zone / "max_energy_range_uj").read_text().strip()) / 1e6
    except (OSError, ValueError):
        return 0.0


def _nvml_joules() -> dict[str, float]:
    """Total energy counters of NVIDIA GPUs (mJ since driver load), when pynvml and a GPU are present."""
    try:
        import pynvml
    except ImportError:
        return {}
    out: dict[str, float] = {}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver / no GPU: nothing measured, callers estimate
        log.debug("NVML unavailable: %s", e)
        return {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out[f"nvml:gpu{i}"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3
    except Exception as e:
        log.debug("NVML energy counter unavailable: %s", e)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as e:
            log.debug("nvmlShutdown failed: %s", e)
    return out
