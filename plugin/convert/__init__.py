"""HF checkpoint -> Optimum ONNX -> int4/int8/fp16/fp32 -> onnxruntime-genai folder, cached and verified.

    from plugin.convert import export
    exported = export("default", target="npu", precision="int4")
    exported.path  # genai_config.json, model.onnx(+.data), tokenizer files, manifest.json

Steps: hash source -> Optimum export (fp32) -> precision conversion -> tokenizer + genai_config ->
parity check -> manifest -> atomic publish into `<home>/exports/<key>`. See cache.py for the key and
the lock, targets.py for what each execution provider can load, parity.py for the thresholds.
int4/fp32 exports for the cpu target build the fused graph instead of the Optimum graph + conversion
(`graph="auto"`, fused.py); architectures it cannot take fall back to the plain path with the reason.
The npu target builds a static-shape QDQ pipeline compiled for Qualcomm's QNN HTP (`graph="qnn"`, qnn/).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from plugin.convert import cache
from plugin.convert.errors import ExportError, disk_full_is_clear
from plugin.convert.onnx_files import DATA_FILE, MODEL_FILE
from plugin.convert.steps import StepTimer
from plugin.convert.targets import (
    PRECISIONS,
    TARGETS,
    check_target,
    provider_options_for,
    providers_report,
    qnn_providers_report,
)

__all__ = [
    "PRECISIONS",
    "SUPPORTED_ARCHITECTURES",
    "TARGETS",
    "ExportError",
    "ExportedModel",
    "export",
    "provider_options_for",
    "verify_export",
]

log = logging.getLogger(__name__)

_VERSIONED = ("optimum", "optimum-onnx", "onnxruntime", "onnxruntime-genai", "transformers", "torch", "onnx")
EXPORT_FORMAT = 3  # bump when this package changes what it writes for the same inputs (3: parity via teacher forcing)


@dataclass(frozen=True)
class ExportedModel:
    path: Path  # the onnxruntime-genai folder (genai_config.json, model.onnx(+.data), tokenizer files)
    target: str  # "npu" | "cpu" | "gpu"
    precision: str  # "int4" | "int8" | "fp16" | "fp32"
    key: str
    manifest: dict
    cache_hit: bool


def _versions() -> dict[str, str]:
    out = {"accelserve-export-format": str(EXPORT_FORMAT)}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    try:
        import onnxruntime_genai as og

        out["onnxruntime-genai-build"] = getattr(og, "__id__", "onnxruntime-genai")  # -cuda / -directml builds
    except ImportError as e:
        raise ExportError("onnxruntime-genai is not installed; install the project's pinned dependencies") from e
    return out


def _home(home: Path | None) -> Path:
    from plugin.home import accelserve_home

    return Path(home).expanduser() if home is not None else accelserve_home()


def _resolve(model_ref: str | Path, home: Path) -> tuple[Path, str, str]:
    """(local HF folder, display name, reference) for a model reference, via plugin.models.resolve."""
    from plugin.models.resolve import resolve_model

    try:
        resolved = resolve_model(model_ref, home=home)
    except Exception as e:  # ModelSourceError and friends: keep their user-facing message
        raise ExportError(str(e)) from e
    name = getattr(resolved.profile, "name", None) or Path(resolved.path).name
    return Path(resolved.path), str(name), str(resolved.ref)


def _read_hf_config(source: Path) -> dict[str, Any]:
    path = source / "config.json"
    if not path.is_file():
        raise ExportError(f"{source} has no config.json; point at a Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def __getattr__(name: str) -> Any:
    """`SUPPORTED_ARCHITECTURES`: computed from the installed libraries on first use (architectures.py)."""
    if name == "SUPPORTED_ARCHITECTURES":
        from plugin.convert.architectures import support_table

        return tuple(row.model_type for row in support_table() if row.status != "refused")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_architecture(hf_config: dict[str, Any], source: Path | str = "", precision: str | None = None) -> str:
    """The checkpoint's model_type; ExportError (before any work) when it cannot be served, with the reason."""
    from plugin.convert.architectures import check_architecture as check

    return check(hf_config, source, precision).model_type


def _check_local_architecture(model_ref: str | Path) -> None:
    """A local folder's architecture is checked before resolving it: resolving reads a text decoder's sizes,
    which a refused architecture (an image-text wrapper, say) may not have, and the user needs the reason."""
    folder = Path(str(model_ref)).expanduser()
    if (folder / "config.json").is_file():
        check_architecture(_read_hf_config(folder), folder)


def _config_provider_options(target: str, precision: str) -> tuple[list[dict[str, Any]], str]:
    """Provider written into genai_config: one this onnxruntime-genai build has and that runs the format.

    A GPU export on a build without CUDA/DirectML names the CPU (every precision loads there), so the folder
    always loads as written; builds with a GPU provider have a different onnxruntime-genai distribution
    name, which is part of the cache key, so they never share a folder with CPU builds.
    """
    import onnxruntime_genai as og

    if target == "gpu":
        for provider, available in (("cuda", og.is_cuda_available()), ("dml", og.is_dml_available())):
            if available:
                try:
                    return provider_options_for(target, provider, precision), provider
                except ExportError as e:
                    log.info("not writing %s into genai_config: %s", provider, e)
    # npu: no NPU provider runs a dynamic-shape MatMulNBits graph (see targets.py), so the config names
    # the CPU floor and the backend chooses a present accelerator's provider at load time.
    return [], "cpu"


def _build(
    source: Path,
    tmp: Path,
    target: str,
    precision: str,
    block_size: int,
    symmetric: bool,
    timer: StepTimer,
    graph: str = "plain",
    qnn_shape: tuple[int, int] | None = None,
    memory: str = "fast",
) -> dict[str, Any]:
    """Fill `tmp` with a complete export (minus manifest); return manifest fields it learned."""
    if graph == "qnn":
        from plugin.convert.qnn.build import build_qnn_package

        window, context_length = qnn_shape or (0, 0)
        return build_qnn_package(
            source, tmp, precision, window=window, context_length=context_length, block_size=block_size, timer=timer
        )
    from plugin.convert.genai_config import write_genai_config
    from plugin.convert.optimum_step import optimum_export
    from plugin.convert.quantize import convert_precision
    from plugin.convert.tokenizer_files import copy_tokenizer

    # --- fused graph (fused.py); on any reason it cannot be built, the plain Optimum graph below ---
    fallback_reason = None
    if graph == "fused":
        from plugin.convert.fused import try_build_fused

        learned, fallback_reason = try_build_fused(
            source, tmp, target, precision, block_size, symmetric, timer, _config_provider_options, memory
        )
        if learned is not None:
            return learned
    # --- plain graph ---
    work = tmp / ".work"
    with timer.step("optimum_export", "Optimum ONNX export (fp32)"):
        fp32 = optimum_export(source, work)
    with timer.step("quantize", f"precision {precision}"):
        if precision == "fp32":
            for name in (MODEL_FILE, DATA_FILE):
                if (fp32.parent / name).exists():
                    shutil.move(fp32.parent / name, tmp / name)
            from plugin.convert.quantize import QuantResult

            quant = QuantResult(tmp / MODEL_FILE, "fp32 reference (no conversion)")
        else:
            quant = convert_precision(fp32, tmp, precision, block_size, symmetric)
    shutil.rmtree(work)
    with timer.step("genai_config", "tokenizer + genai_config.json"):
        copy_tokenizer(source, tmp)
        options, provider = _config_provider_options(target, precision)
        write_genai_config(tmp, source, MODEL_FILE, options)
    graph_record = {"requested": graph, "built": "plain", "fallback_reason": fallback_reason}
    quantization = {"method": quant.method, **quant.details}
    return {"quantization": quantization, "config_provider": provider, "graph": graph_record}


def _check_output(output: Path, key: str, force: bool) -> bool:
    """True when `output` already holds this exact export, verified; raises for a folder we must not touch."""
    if not output.exists():
        return False
    if not output.is_dir():
        raise ExportError(f"output {output} is a file; pass a folder path")
    if not any(output.iterdir()):
        return False
    manifest = cache.read_manifest(output)
    if manifest is None:
        raise ExportError(
            f"output folder {output} is not empty and holds no accelserve export (no manifest.json); "
            "choose a new or empty folder so nothing of yours is overwritten"
        )
    if force:
        return False
    problems = cache.verify_folder(output)
    if problems:
        raise ExportError(
            f"output folder {output} does not match its manifest: {'; '.join(problems)}. "
            "Delete the folder or re-run with force=True (--force) to rebuild it."
        )
    return manifest.get("key") == key


def verify_export(folder: Path) -> list[str]:
    """Problems that make `folder` not a complete, unmodified export (empty list = valid)."""
    return cache.verify_folder(Path(folder))


def export(
    model_ref: str | Path,
    target: str = "npu",
    precision: str = "int4",
    *,
    output: Path | None = None,
    force: bool = False,
    block_size: int = 32,
    symmetric: bool = True,
    parity: bool = True,
    home: Path | None = None,
    progress: bool = True,
    graph: str = "auto",
    context_length: int | None = None,
    window: int | None = None,
    memory: str = "fast",
) -> ExportedModel:
    """Export `model_ref` for onnxruntime-genai on `target` at `precision`, through the cache.

    The same inputs again are a cache hit (the folder is verified against its manifest, in seconds); a
    cache folder that fails verification is rebuilt with a warning. With `output`, the verified cache
    folder is copied there and `path` points at it. Raises ExportError with a user-ready message.
    `graph`: "fused" (ORT contrib-op graph, fused.py), "plain" (Optimum graph + MatMulNBits) or "auto"
    (fused for int4/fp32 on cpu; architectures it cannot take fall back to plain, reason logged) or "qnn"
    (what "auto" means for target "npu": the QNN HTP pipeline, qnn/). `context_length` (default 1024) and
    `window` (prefill window, default 64) shape the HTP pipeline and are part of its cache key.
    `memory` (fused int4 only): "fast" (default, int8 compute everywhere) or "lean" (fp32-compute MLP: less
    resident memory, slower decode); see docs/fused-export.md.
    """
    from plugin.convert.fused import graph_key_options, resolve_graph
    from plugin.convert.qnn import check_qnn_request, default_qnn_shape, qnn_key_options

    check_target(target, precision)
    if graph == "qnn" and target != "npu":
        raise ExportError(f"graph='qnn' (the QNN HTP pipeline) is built for target 'npu', not {target!r}")
    graph = "qnn" if target == "npu" and graph in ("auto", "qnn") else resolve_graph(graph, target, precision)
    from plugin.convert.fused_memory import DEFAULT_MEMORY_PRESET, check_memory_preset

    check_memory_preset(memory)
    if memory != DEFAULT_MEMORY_PRESET and (graph != "fused" or precision != "int4"):
        raise ExportError(
            f"memory={memory!r} shapes the fused int4 graph (got graph {graph!r}, precision {precision!r}); "
            f"drop it or use precision 'int4' with graph 'auto' or 'fused'"
        )
    if graph != "qnn" and (context_length is not None or window is not None):
        raise ExportError("context_length and window shape the NPU (QNN HTP) pipeline; use them with target 'npu'")
    home_dir = _home(home)
    _check_local_architecture(model_ref)
    source, name, ref = _resolve(model_ref, home_dir)
    hf_config = _read_hf_config(source)
    arch = check_architecture(hf_config, source, precision)
    qnn_shape = default_qnn_shape(hf_config, window, context_length)
    if graph == "qnn":
        check_qnn_request(hf_config, precision, *qnn_shape)
    if precision in ("int4", "int8") and (block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"block_size must be a power of two >= 16 (got {block_size}); 32 or 128 are typical")

    root = home_dir / "exports"
    timer = StepTimer(progress=progress, label=f"[{name} {target}/{precision}] ")
    started = time.perf_counter()
    with timer.step("hash_source", "hashing source checkpoint"):
        source_hash = cache.hash_source(source, memo=root / cache.HASH_MEMO)
    options = {"block_size": block_size, "symmetric": symmetric} if precision in ("int4", "int8") else {}
    options.update(qnn_key_options(*qnn_shape) if graph == "qnn" else graph_key_options(graph, precision, memory))
    versions = _versions()
    key = cache.compute_key(name, target, precision, source_hash, options, versions)
    final = root / key
    out_path = Path(output).expanduser().resolve() if output is not None else None

    if out_path is not None and _check_output(out_path, key, force):
        manifest = cache.read_manifest(out_path) or {}
        if not parity or manifest.get("parity") is not None:
            return ExportedModel(out_path, target, precision, key, manifest, cache_hit=True)

    with cache.key_lock(root, key), disk_full_is_clear(root):
        cache.clean_stale_tmp(root, key)
        problems = cache.verify_folder(final, key) if final.exists() else ["not built yet"]
        if final.exists() and problems and not force:
            log.warning("cached export %s is damaged (%s); rebuilding it", final, "; ".join(problems))
        cache_hit = not problems and not force
        if not cache_hit:
            tmp = cache.new_tmp_dir(root, key)
            try:
                learned = _build(source, tmp, target, precision, block_size, symmetric, timer, graph, qnn_shape, memory)
                parity_report = None
                if parity:
                    parity_report = _run_parity(tmp, source, precision, timer, graph)
                manifest = {
                    "manifest_version": cache.MANIFEST_VERSION,
                    "key": key,
                    "source": {"ref": ref, "name": name, "path": str(source), "sha256": source_hash},
                    "architecture": arch,
                    "target": target,
                    "precision": precision,
                    "options": options,
                    "versions": versions,
                    **learned,
                    "providers": qnn_providers_report() if graph == "qnn" else providers_report(precision),
                    "parity": parity_report,
                    "timings_s": dict(timer.timings),
                    "created_unix": int(time.time()),
                    "files": cache.file_records(tmp),
                }
                manifest["total_size_bytes"] = sum(f["size"] for f in manifest["files"].values())
                cache.write_manifest(tmp, manifest)
                cache.publish(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        manifest = cache.read_manifest(final) or {}
        if cache_hit and parity and manifest.get("parity") is None:
            manifest["parity"] = _run_parity(final, source, precision, timer, graph)
            manifest["timings_s"] = {**manifest.get("timings_s", {}), "parity": timer.timings["parity"]}
            cache.write_manifest(final, manifest)

    path = final
    if out_path is not None and out_path != final:
        with disk_full_is_clear(out_path.parent):
            cache.copy_to_output(final, out_path)
        path = out_path
    log.info("export %s %s in %.1fs -> %s", "hit" if cache_hit else "built", key, time.perf_counter() - started, path)
    return ExportedModel(path, target, precision, key, manifest, cache_hit)


def _run_parity(folder: Path, source: Path, precision: str, timer: StepTimer, graph: str = "") -> dict[str, Any]:
    from plugin.convert.parity import run_parity

    if graph == "qnn":
        from plugin.convert.qnn.build import run_qnn_parity

        return run_qnn_parity(folder, source, precision, timer)

    with timer.step("parity", "parity check against torch"):
        report = run_parity(folder, source, precision)
    if precision == "fp32" and not report.passed:
        raise ExportError(
            f"fp32 export does not reproduce the torch model: greedy tokens match on "
            f"{sum(report.generation_match)}/{report.prompts} prompts (torch's logit gaps where the others part: "
            f"{report.generation_ties}), top-1 agreement {report.top1_agreement}, "
            f"max logit diff {report.max_logit_diff}. This is an exporter bug for this architecture; please report it."
        )
    return report.to_dict()
