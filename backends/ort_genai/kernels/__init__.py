"""The rows kernel: a block-quantized GEMM that unpacks each 4-/8-bit block once for up to 8 rows.

onnxruntime's MatMulNBits (MLAS, int8 compute) unpacks B per row of A, so a shared decode step of 8 rows
costs ~3.7x a step of one and continuous batching gains little on few cores. `rows_gemm.cc` is the same
product at the same numerics class (A quantized per block to int8, as MLAS's int8 compute does), with a
block of B unpacked once into a register and multiplied against every row of the tile (AVX-512 VNNI).
A row's result never depends on the other rows of its step.

The batched runner's session uses it when it can (`rows_kernel`, `rows_graph`): the C++ source is built with the
system compiler on first use and cached by content under `<home>/kernels`; the graph gets its int8-compute
MatMulNBits nodes retyped to `accelserve.RowsMatMulNBits` (a cached copy of `model.onnx` only, the weights
file is shared). Where it cannot (no AVX-512 VNNI, no compiler, a build error, `ACCELSERVE_ROWS_KERNEL=0`),
the session keeps onnxruntime's kernels and the reason is reported. The operator is in docs/fused-export.md.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.home import accelserve_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rows_gemm.cc")
INCLUDE = Path(__file__).with_name("include")
DOMAIN = "accelserve"
OP_TYPE = "RowsMatMulNBits"
SWITCH_ENV = "ACCELSERVE_ROWS_KERNEL"  # "0": keep onnxruntime's MatMulNBits
DIR_ENV = "ACCELSERVE_KERNELS_DIR"  # where built kernels and retyped graphs are cached (default <home>/kernels)
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
REWRITE_VERSION = "2"  # bump when the rewrite rules change: cached graphs are keyed by it
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
"""onnxruntime's session option: where a graph loaded from bytes finds its external data file."""


@dataclass(frozen=True)
class RowsKernel:
    """The built library, or why there is none (`reason`)."""

    library: Path | None
    reason: str


def kernels_dir() -> Path:
    raw = os.environ.get(DIR_ENV)
    folder = Path(raw).expanduser() if raw else accelserve_home() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is not available)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def missing_cpu_features(flags: frozenset[str]) -> list[str]:
    return [flag for flag in REQUIRED_FLAGS if flag not in flags]


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: $CXX, else g++ (None when not on PATH)."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    for header in sorted(INCLUDE.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(" ".join(COMPILE_FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest.update(version.encode())
    return digest.hexdigest()[:16]


def build(compiler: str, target: Path) -> None:
    """Compile rows_gemm.cc into `target` (atomically: a half-written library is never loaded)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *COMPILE_FLAGS, f"-I{INCLUDE}", str(SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            log.warning("%s failed:\n%s", " ".join(cmd), done.stderr.strip()[-4000:])
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{compiler} exited {done.returncode}: {errors[0].strip() if errors else 'no output'}")
        os.replace(out, target)


@functools.cache
def rows_kernel() -> RowsKernel:
    """The rows kernel's library for this machine, built on first use; memoised per process."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return RowsKernel(None, f"{SWITCH_ENV}=0: onnxruntime's MatMulNBits")
    missing = missing_cpu_features(cpu_flags())
    if missing:
        return RowsKernel(None, f"this CPU lacks {', '.join(missing)}: onnxruntime's MatMulNBits")
    compiler_path = compiler()
    if compiler_path is None:
        return RowsKernel(None, "no C++ compiler (g++ or $CXX) to build the rows kernel: onnxruntime's MatMulNBits")
    try:
        target = kernels_dir() / f"rows_gemm-{_build_key(compiler_path)}.so"
        if not target.exists():
            log.info("building the rows kernel (once per machine and source): %s", target)
            build(compiler_path, target)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("rows kernel not built, onnxruntime's MatMulNBits instead: %s", exc)
        return RowsKernel(None, f"rows kernel build failed ({exc}): onnxruntime's MatMulNBits")
    return RowsKernel(target, "")


def rows_graph(model_file: Path) -> tuple[Path | None, int]:
    """A cached copy of `model_file` with its int8-compute MatMulNBits retyped to the rows kernel, and how many
    nodes were; (None, 0) when none qualifies. The rewrite runs in a child process so serving never imports
    onnx (docs/fused-export.md: a warm serving process holds no onnx)."""
    graph = model_file.read_bytes()
    if b"MatMulNBits" not in graph:  # fp32 / fp16 exports: nothing to retype, no child process
        return None, 0
    key = hashlib.sha256(graph + REWRITE_VERSION.encode()).hexdigest()[:20]
    cached = kernels_dir() / "graphs" / f"{key}.onnx"
    count_file = cached.with_suffix(".count")
    if not count_file.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            out = Path(tmp) / cached.name
            cmd = [sys.executable, "-m", "backends.ort_genai.kernels.rewrite", str(model_file), str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=_project_root())
            if done.returncode != 0:
                raise RuntimeError(f"retyping MatMulNBits in {model_file} failed: {done.stderr.strip()[-2000:]}")
            count = int(done.stdout.strip().splitlines()[-1])
            if count:
                os.replace(out, cached)
            (Path(tmp) / "count").write_text(str(count))
            os.replace(Path(tmp) / "count", count_file)
    count = int(count_file.read_text())
    return (cached if count else None), count


def open_retyped_session(library: Path, retyped: Path, model_dir: Path, options: Any) -> Any:
    """An onnxruntime CPU session on a retyped graph: the kernel library registered, the graph read from the
    kernel cache, its weights from the export's own data file in `model_dir`. `options` is the caller's
    SessionOptions (threads, logging), completed here."""
    import onnxruntime as ort

    options.register_custom_ops_library(str(library))
    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(model_dir))
    return ort.InferenceSession(retyped.read_bytes(), options, providers=["CPUExecutionProvider"])


def _project_root() -> Path:
    return Path(__file__).resolve().parents[3]
