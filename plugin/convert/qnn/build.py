"""Build the HTP package into the export's temp folder, step by step (called by export()).

weights -> fp32 graphs -> calibration -> QDQ (w8a16 / w4a16) -> HTP compile (EP context) -> config.
Parity (parity.py) runs afterwards, from `run_qnn_parity`, on the folder as it will be published.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from plugin.convert.errors import ExportError
from plugin.convert.onnx_files import save_model
from plugin.convert.qnn import calibration, graphs
from plugin.convert.qnn.compile import compile_context, context_files
from plugin.convert.qnn.config import build_pipeline_config, choose_pad_token
from plugin.convert.qnn.quantize import (
    CALIBRATION_METHOD,
    QuantReport,
    calibrate,
    infer_shapes,
    matmul_weights,
    quantize_graph,
    to_int4_blocks,
    wide_range_nodes,
)
from plugin.convert.qnn.runner import PipelineRunner, PipelineShape, cpu_session
from plugin.convert.steps import StepTimer

log = logging.getLogger(__name__)

CONTEXT_QDQ, ITERATOR_QDQ = "context.qdq.onnx", "iterator.qdq.onnx"
CONTEXT_CTX, ITERATOR_CTX = "context_ctx.onnx", "iterator_ctx.onnx"
SCHEMES = {"int8": "w8a16", "int4": "w4a16"}
QNN_FORMAT = 1  # bump when this package changes what it writes for the same inputs
# w4a16: matrices kept at 8 bits (name substrings). On the default model all-int4 agreed with torch's
# top-1 on 0.72 of positions (CPU run of the QDQ graph), int8 down_proj 0.75, int8 v_proj + down_proj 0.82.
INT4_SENSITIVE: tuple[str, ...] = ("v_proj", "down_proj")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def pipeline_shape(folder: Path) -> PipelineShape:
    """The runner's shape from a package's genai_config.json."""
    cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
    dec = cfg["decoder"]
    return PipelineShape(
        layers=dec["num_hidden_layers"],
        kv_heads=dec["num_key_value_heads"],
        head_dim=dec["head_size"],
        window=dec["sliding_window"]["window_size"],
        context_length=cfg["context_length"],
        pad_token_id=cfg["pad_token_id"],
    )


def cpu_runner(folder: Path, context: str = CONTEXT_QDQ, iterator: str = ITERATOR_QDQ) -> PipelineRunner:
    """The package's QDQ (or fp32) transformer graphs on the CPU provider."""
    return PipelineRunner(
        pipeline_shape(folder),
        cpu_session(folder / graphs.EMBEDDINGS),
        cpu_session(folder / context),
        cpu_session(folder / iterator),
        cpu_session(folder / graphs.LM_HEAD),
    )


def htp_runner(folder: Path, provider_options: dict[str, str]) -> PipelineRunner:
    """The package's compiled `_ctx.onnx` graphs on HTP (no CPU fallback); embeddings and lm_head on the CPU."""
    from plugin.convert.qnn.compile import htp_session

    return PipelineRunner(
        pipeline_shape(folder),
        cpu_session(folder / graphs.EMBEDDINGS),
        htp_session(folder / CONTEXT_CTX, provider_options),
        htp_session(folder / ITERATOR_CTX, provider_options),
        cpu_session(folder / graphs.LM_HEAD),
    )


def write_fp32_pipeline(spec: Any, folder: Path, work: Path, window: int, context_length: int) -> PipelineRunner:
    """CPU graphs into `folder`, fp32 transformer graphs (shape-annotated) into `work`; returns an fp32 runner."""
    graphs.write_cpu_graphs(spec, folder)
    for name, seq in ((graphs.CONTEXT, window), (graphs.ITERATOR, 1)):
        raw = work / f"raw-{name}"
        save_model(graphs.transformer_graph(spec, seq, context_length), raw)
        infer_shapes(raw, work / name)
        raw.unlink()
        raw.with_name(raw.name + ".data").unlink(missing_ok=True)
    return PipelineRunner(
        PipelineShape(len(spec.layers), spec.kv_heads, spec.head_dim, window, context_length, 0),
        cpu_session(folder / graphs.EMBEDDINGS),
        cpu_session(work / graphs.CONTEXT),
        cpu_session(work / graphs.ITERATOR),
        cpu_session(folder / graphs.LM_HEAD),
    )


def _fp32_weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2}


def build_qnn_package(
    source: Path,
    folder: Path,
    precision: str,
    *,
    window: int,
    context_length: int,
    block_size: int,
    timer: StepTimer,
) -> dict[str, Any]:
    """Fill `folder` with the decoder-pipeline package (minus manifest); return the manifest fields it learned."""
    from backends import qnn_ep
    from plugin.convert.qnn.spec import load_spec
    from plugin.convert.tokenizer_files import copy_tokenizer

    if precision not in SCHEMES:
        raise ExportError(f"the HTP pipeline is built at int4 (w4a16) or int8 (w8a16), not {precision!r}")
    qnn_ep.register()
    work = folder / ".work"
    work.mkdir()
    hf_config = _read_json(source / "config.json") or {}
    gen_config = _read_json(source / "generation_config.json")
    with timer.step("load_weights", "reading the checkpoint"):
        spec = load_spec(source, context_length)
    with timer.step("fp32_graphs", f"fp32 graphs (window {window}, context {context_length})"):
        fp32 = write_fp32_pipeline(spec, folder, work, window, context_length)
        fp32.shape.pad_token_id = choose_pad_token(hf_config, gen_config)
    with timer.step("calibrate", f"calibration ({len(calibration.CALIBRATION_SET)} prompts, fp32 on the CPU)"):
        samples = calibration.tokenize_set(source, context_length)
        ranges = calibrate(
            [
                (work / graphs.CONTEXT, calibration.context_feeds(fp32, samples)),
                (work / graphs.ITERATOR, calibration.iterator_feeds(fp32, samples)),
            ],
            work,
        )
    del fp32
    report = QuantReport(scheme=SCHEMES[precision], weight_bits=4 if precision == "int4" else 8)
    with timer.step("quantize", f"static QDQ {report.scheme}"):
        keep_float = wide_range_nodes(work / graphs.CONTEXT, ranges)  # same names in both graphs
        report.float_nodes = keep_float
        quantize_graph(work / graphs.CONTEXT, folder / CONTEXT_QDQ, ranges, work, keep_float)
        quantize_graph(work / graphs.ITERATOR, folder / ITERATOR_QDQ, ranges, work, keep_float)
        if precision == "int4":
            weights = _fp32_weights(work / graphs.CONTEXT)
            for name in (CONTEXT_QDQ, ITERATOR_QDQ):
                to_int4_blocks(folder / name, weights, block_size, INT4_SENSITIVE)
            report.block_size = block_size
            report.int8_sensitive = list(INT4_SENSITIVE)
        formats = matmul_weights(folder / CONTEXT_QDQ)
        report.int4_matmuls, report.int8_matmuls, report.float_matmuls = (
            formats["int4"],
            formats["int8"],
            formats["float"],
        )
        report.float_ops = _float_ops(folder / CONTEXT_QDQ)
    shutil.rmtree(work)
    affinity = qnn_ep.write_op_affinity(folder)
    compile_options = qnn_ep.htp_provider_options(affinity)
    compile_s: dict[str, float] = {}
    for src, dst, label in ((CONTEXT_QDQ, CONTEXT_CTX, "context"), (ITERATOR_QDQ, ITERATOR_CTX, "iterator")):
        with timer.step(f"compile_{label}", f"QNN HTP compile of the {label} graph"):
            compile_s[label] = round(compile_context(folder / src, folder / dst, compile_options), 2)
    with timer.step("genai_config", "tokenizer + genai_config.json"):
        copy_tokenizer(source, folder)
        config = build_pipeline_config(
            spec,
            hf_config,
            gen_config,
            window=window,
            context_length=context_length,
            context_file=CONTEXT_CTX,
            iterator_file=ITERATOR_CTX,
            provider_options=qnn_ep.htp_provider_options(),
        )
        (folder / "genai_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    binaries = {
        label: [p.name for p in context_files(folder / f)]
        for label, f in (("context", CONTEXT_CTX), ("iterator", ITERATOR_CTX))
    }
    return {
        "quantization": {"method": f"static QDQ {report.scheme} for QNN HTP", **report.to_dict()},
        "calibration": {**calibration.calibration_record(), "method": CALIBRATION_METHOD},
        "config_provider": "qnn",
        "graph": {"requested": "qnn", "built": "qnn", "fallback_reason": None},
        "pipeline": {
            "type": "decoder-pipeline",
            "window": window,
            "context_length": context_length,
            "kv_buffer": [1, spec.kv_heads, context_length, spec.head_dim],
            "pad_token_id": config["model"]["pad_token_id"],
            "htp": qnn_ep.htp_kind(),
            "graphs": {
                "embeddings": {"file": graphs.EMBEDDINGS, "provider": "CPUExecutionProvider", "precision": "fp32"},
                "context": {
                    "file": CONTEXT_CTX,
                    "provider": qnn_ep.EP_NAME,
                    "shape": [1, window],
                    "source": CONTEXT_QDQ,
                    "files": binaries["context"],
                    "compile_s": compile_s["context"],
                },
                "iterator": {
                    "file": ITERATOR_CTX,
                    "provider": qnn_ep.EP_NAME,
                    "shape": [1, 1],
                    "source": ITERATOR_QDQ,
                    "files": binaries["iterator"],
                    "compile_s": compile_s["iterator"],
                },
                "lm_head": {"file": graphs.LM_HEAD, "provider": "CPUExecutionProvider", "precision": "fp32"},
            },
            "load_provider_options": qnn_ep.htp_provider_options(),
            "cpu_fallback": "disabled for the context and iterator graphs (session.disable_cpu_ep_fallback=1)",
        },
    }


def _float_ops(path: Path) -> dict[str, int]:
    """Ops with no QDQ form that HTP runs in fp16 (GroupQueryAttention, the norms)."""
    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if n.op_type in ("GroupQueryAttention", "SimplifiedLayerNormalization", "LayerNormalization"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def run_qnn_parity(folder: Path, source: Path, precision: str, timer: StepTimer) -> dict[str, Any]:
    """Parity on HTP (see parity.py); the sessions are closed before the folder is published."""
    from backends import qnn_ep
    from plugin.convert.qnn.parity import measure

    with timer.step("parity", "parity on the HTP (teacher forcing vs torch, vs the CPU provider)"):
        runners = {"htp": htp_runner(folder, qnn_ep.htp_provider_options()), "cpu": cpu_runner(folder)}
        context_length = runners["cpu"].shape.context_length
        report = measure(folder, source, precision, runners, f"htp-{qnn_ep.htp_kind()}", context_length)
        del runners
    return report.to_dict()
