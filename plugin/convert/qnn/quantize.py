"""Static QDQ quantization for HTP: uint16 activations, int8 per-channel or int4 block weights.

- Shapes first: onnx's shape inference stops at com.microsoft ops (GroupQueryAttention), and both the
  quantizer (it skips tensors of unknown type) and QNN ("Cannot get shape") need every tensor's shape,
  so onnxruntime's symbolic shape inference annotates the graph before and after quantization.
- One set of activation ranges for both transformer graphs: the context and iterator graphs share
  tensor names, ranges are calibrated on each and merged, so the KV cache one graph writes is read by
  the other at the same scale and both graphs hold identical weights.
- onnxruntime's QNN recipe (`get_qnn_qdq_config`) sets the operator-specific overrides HTP needs
  (Sigmoid's fixed output scale, 16-bit MatMul inputs, ...). LayerNormalization (gpt2) stays float and
  runs in fp16 on HTP: QNN rejects it with 16-bit activations and 8-bit weights ("Failed to add node").
  GroupQueryAttention and SimplifiedLayerNormalization have no QDQ form and run in fp16 too.
- What stays in float (fp16 on HTP, `enable_htp_fp16_precision`): the residual stream and the norms
  reading it, and every MatMul/Mul whose calibrated span exceeds FLOAT_RANGE. Small LLMs carry a few
  "massive activations" (SmolLM2: ~13,000 in the residual, down_proj outputs spanning 26,000); one
  uint16 range over them leaves a step of ~0.4 for every ordinary token. Measured on the default model
  (CPU run of the QDQ graph, top-1 vs torch): w8a16 0.78 with everything quantized, 0.93 with these
  in fp16.
- int4 (`w4a16`): the int8 per-channel weights of every MatMul are replaced by int4 blocks of
  `block_size` along the input dimension (DequantizeLinear with `block_size`, which HTP compiles with
  soc_model 60), each block's scale chosen by a small clipping search (least squared error) rather
  than the plain absmax. Matrices named in `sensitive` keep their 8-bit weights.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from plugin.convert.errors import ExportError
from plugin.convert.onnx_files import save_model

log = logging.getLogger(__name__)

FLOAT_ON_HTP = ("LayerNormalization",)  # left unquantized: fp16 on HTP (see module docstring)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
CALIBRATION_METHOD = "MinMax"
# The residual stream carries the "massive activations" of the first tokens (about 13,000 in SmolLM2);
# one uint16 range over them leaves a step of ~0.4 for every other token. In fp16 it keeps 11 bits
# of mantissa at every magnitude.
RESIDUAL_IN_FLOAT = True
FLOAT_RANGE = 512.0  # calibrated span above which a MatMul/Mul stays in float (see wide_range_nodes)


@dataclass
class QuantReport:
    """What quantization did (goes into the manifest's `quantization`)."""

    scheme: str
    activation_type: str = "uint16"
    weight_bits: int = 8
    block_size: int | None = None
    calibration_method: str = CALIBRATION_METHOD
    int4_matmuls: int = 0
    int8_matmuls: int = 0
    float_matmuls: int = 0
    int8_sensitive: list[str] = field(default_factory=list)  # w4a16: matrices kept at 8 bits
    float_ops: dict[str, int] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)  # wide-range MatMul/Mul kept in fp16
    float_range: float = FLOAT_RANGE
    residual_in_float: bool = RESIDUAL_IN_FLOAT

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def infer_shapes(src: Path, dst: Path) -> None:
    """Annotate every tensor with its (static) shape; writes `dst` (+ .data)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(src))
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    if inferred is None:
        raise ExportError(f"shape inference failed on {src.name}; the HTP compiler needs every tensor's shape")
    save_model(inferred, dst)


class _Reader:
    """CalibrationDataReader over a (lazy) iterable of feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def wide_range_nodes(model_path: Path, ranges: Any, limit: float = FLOAT_RANGE) -> list[str]:
    """MatMul/Mul nodes whose calibrated input or output span exceeds `limit`: kept in float (fp16 on HTP).

    A few MLPs produce the model's massive activations (SmolLM2: down_proj of layers 11, 28, 29 spans
    ~10,000-26,000); one uint16 range over them leaves a step of ~0.4 for every ordinary token.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    span = {name: float(np.max(d.range_value[1]) - np.min(d.range_value[0])) for name, d in ranges.data.items()}
    wide = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Mul") and any(span.get(t, 0.0) > limit for t in (*n.input, *n.output)):
            wide.append(n.name)
    return wide


def qnn_config(model_path: Path, keep_float: list[str] | None = None) -> Any:
    """onnxruntime's QNN QDQ recipe for this graph: uint16 activations, int8 symmetric per-channel weights."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    model = onnx.load(str(model_path), load_external_data=False)
    op_types = sorted({n.op_type for n in model.graph.node} - set(FLOAT_ON_HTP))
    return get_qnn_qdq_config(
        model,
        _Reader([]),
        activation_type=QuantType.QUInt16,
        weight_type=QuantType.QInt8,
        per_channel=True,
        weight_symmetric=True,
        op_types_to_quantize=op_types,
        nodes_to_exclude=[*float_nodes(model), *(keep_float or [])] or None,
    )


def matmul_weights(path: Path) -> dict[str, int]:
    """MatMul count per weight format in a QDQ graph: int4 (blocks), int8 (per channel), float (fp16 on HTP)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    counts = {"int4": 0, "int8": 0, "float": 0}
    for n in graph.node:
        if n.op_type != "MatMul":
            continue
        dq = producers.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            counts["float"] += 1
        else:
            counts["int4" if any(a.name == "block_size" for a in dq.attribute) else "int8"] += 1
    return counts


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes kept in float (fp16 on HTP) with their inputs: the residual stream and the norms reading it.

    Excluding the residual Adds alone is not enough: an op without a QDQ form (the norms) still gets its
    inputs quantized, so the norms are excluded too; their outputs are quantized by the MatMuls they feed.
    """
    if not RESIDUAL_IN_FLOAT:
        return []
    keep = ("SimplifiedLayerNormalization", "LayerNormalization", "Identity")
    return [n.name for n in model.graph.node if n.name.endswith(".residual") or n.op_type in keep]


def calibrate(graphs: list[tuple[Path, Iterable[dict[str, np.ndarray]]]], work: Path) -> Any:
    """MinMax ranges of every tensor over all feeds of all graphs, merged by tensor name (TensorsData)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, create_calibrator

    merged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (path, feeds) in enumerate(graphs):
        config = qnn_config(path)
        calibrator = create_calibrator(
            path,
            config.op_types_to_quantize,
            augmented_model_path=str(work / f"augmented_{i}.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
        )
        calibrator.collect_data(_Reader(feeds))
        for name, data in calibrator.compute_data().data.items():
            low, high = np.asarray(data.range_value[0]), np.asarray(data.range_value[1])
            if name in merged:
                low, high = np.minimum(low, merged[name][0]), np.maximum(high, merged[name][1])
            merged[name] = (low, high)
        del calibrator
    return TensorsData(
        CalibrationMethod.MinMax, {k: TensorData(lowest=lo, highest=hi) for k, (lo, hi) in merged.items()}
    )


def quantize_graph(src: Path, dst: Path, ranges: Any, work: Path, keep_float: list[str] | None = None) -> None:
    """Static QDQ of `src` with precomputed `ranges` (uint16 activations, int8 per-channel weights)."""
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod, save_tensors_data

    config = qnn_config(src, keep_float)
    cache = work / f"ranges-{src.stem}.json"
    save_tensors_data(ranges, cache)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        raw = Path(tmp) / "qdq.onnx"
        quantize_static(
            str(src),
            str(raw),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=config.op_types_to_quantize,
            per_channel=True,
            activation_type=config.activation_type,
            weight_type=config.weight_type,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
            nodes_to_exclude=config.nodes_to_exclude,
            extra_options=config.extra_options,
            calibration_cache_path=str(cache),
        )
        infer_shapes(raw, dst)


def _int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks along axis 0 of w [K, N]: (q int8 in [-8, 7] [K, N], scale [K/block, N]).

    Each block's scale is absmax/7 shrunk by the ratio in CLIP_RATIOS with the least squared error.
    """
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    absmax = np.maximum(np.abs(blocks).max(axis=1), 1e-12)  # [K/B, N]
    best_err = np.full(absmax.shape, np.inf, np.float32)
    best_scale = absmax / 7.0
    for ratio in CLIP_RATIOS:
        scale = absmax * ratio / 7.0
        q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7)
        err = ((q * scale[:, None, :] - blocks) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    q = np.clip(np.round(blocks / best_scale[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
    return q, best_scale.astype(np.float32)


def to_int4_blocks(
    qdq_path: Path, fp32_weights: dict[str, np.ndarray], block: int, sensitive: tuple[str, ...] = ()
) -> tuple[int, int]:
    """Rewrite the MatMul weight DequantizeLinear nodes of `qdq_path` to int4 blocks, in place.

    Returns (int4 matmuls, matmuls kept at int8). `fp32_weights` maps the float initializer names
    (`<layer>.weight`) to their values; `sensitive` are name substrings kept at 8 bits.
    """
    model = onnx.load(str(qdq_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    converted = kept = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        float_name = dq.input[0].removesuffix("_quantized")
        w = fp32_weights.get(float_name)
        if w is None or w.ndim != 2 or w.shape[0] % block:
            kept += 1
            continue
        if any(s in float_name for s in sensitive):
            kept += 1
            continue
        q, scale = _int4_blocks(w.astype(np.float32), block)
        qname, sname, zname = f"{float_name}_int4", f"{float_name}_int4_scale", f"{float_name}_int4_zero_point"
        # ml_dtypes.int4 gives packed raw bytes, which go to the external data file like every weight
        graph.initializer.append(numpy_helper.from_array(q.astype(ml_dtypes.int4), qname))
        graph.initializer.append(numpy_helper.from_array(scale, sname))
        graph.initializer.append(numpy_helper.from_array(np.zeros(scale.shape, ml_dtypes.int4), zname))
        for name in dq.input:
            if name in inits:
                graph.initializer.remove(inits.pop(name))
        del dq.input[:]
        dq.input.extend([qname, sname, zname])
        del dq.attribute[:]
        dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        converted += 1
    save_model(model, qdq_path)
    return converted, kept
