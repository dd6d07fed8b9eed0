"""Step 2: precision conversion with onnxruntime's own tools.

- int4: weight-only MatMulNBits (bits=4), block-wise, symmetric by default (the layout CPU, CUDA, DirectML
  and OpenVINO all read; asymmetric adds zero points).
- int8: MatMulNBits with bits=8. onnxruntime >= 1.20's CPU kernel runs 8-bit MatMulNBits, which keeps the
  graph weight-only like int4 (activations stay float, so quality tracks fp32 closely). Dynamic int8
  quantization (QDQ/QOperator MatMulInteger) is the fallback only when the installed onnxruntime's
  quantizer rejects bits=8, because it quantizes activations at run time and changes the graph shape.
- fp16: float16 conversion of weights and activations for GPU targets (CUDA/DirectML); the CPU runs it
  slowly or not at all, so the CPU floor uses fp32/int8/int4.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from plugin.convert.errors import ExportError
from plugin.convert.onnx_files import MODEL_FILE, load_model, save_model

log = logging.getLogger(__name__)

# MatMulNBits accuracy_level 4 = int8 activations inside the kernel: the fast CPU path (what
# onnxruntime-genai's builder uses for CPU int4). 0 would keep fp32 compute.
DEFAULT_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class QuantResult:
    path: Path
    method: str  # human-readable: which tool and why
    details: dict[str, Any] = field(default_factory=dict)


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, W, C) with a constant W as MatMul(A, W) + C, in place; return how many.

    GPT-2's Conv1D layers export as Gemm, which MatMulNBitsQuantizer does not touch; as MatMul they get
    quantized like every other family's Linear layers. Only plain Gemms (alpha=beta=1, no transA) are
    rewritten; a transposed W is stored transposed once.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or len(node.input) < 2 or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T.copy()
            weight = f"{weight}_transposed_for_matmul"
            if weight not in inits:
                t = numpy_helper.from_array(w, weight)
                graph.initializer.append(t)
                inits[weight] = t
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{node.name}_MatMul"))
        if has_bias:
            new_nodes.append(
                onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_Add")
            )
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return count


def _matmul_nbits(src: Path, dst: Path, bits: int, block_size: int, symmetric: bool) -> QuantResult:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"block_size must be a power of two >= 16 (got {block_size}); 32 or 128 are typical")
    model = load_model(src)
    rewritten = gemm_to_matmul(model)
    quant = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=DEFAULT_ACCURACY_LEVEL,
    )
    quant.process()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(quant.model.model, dst)
    n = sum(1 for node in quant.model.model.graph.node if node.op_type == "MatMulNBits")
    if n == 0:
        raise ExportError(f"the quantizer found no MatMul with constant weights in {src}; nothing to quantize")
    return QuantResult(
        dst,
        f"MatMulNBits bits={bits} weight-only (onnxruntime MatMulNBitsQuantizer)",
        {
            "bits": bits,
            "block_size": block_size,
            "symmetric": symmetric,
            "accuracy_level": DEFAULT_ACCURACY_LEVEL,
            "quantized_matmuls": n,
            "gemm_rewritten_as_matmul": rewritten,
        },
    )


def _dynamic_int8(src: Path, dst: Path, reason: str) -> QuantResult:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], use_external_data_format=True
    )
    save_model(load_model(dst), dst)
    return QuantResult(dst, f"dynamic int8 (onnxruntime quantize_dynamic): {reason}", {"bits": 8})


def _fp16(src: Path, dst: Path) -> QuantResult:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(load_model(src), keep_io_types=False, disable_shape_infer=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, dst)
    return QuantResult(dst, "float16 conversion (onnxruntime.transformers.float16)", {"keep_io_types": False})


def convert_precision(
    fp32_model: Path, out_dir: Path, precision: str, block_size: int = 32, symmetric: bool = True
) -> QuantResult:
    """Write `out_dir/model.onnx` at `precision` from the fp32 export; fp32 is copied as is."""
    dst = out_dir / MODEL_FILE
    if precision == "fp32":
        save_model(load_model(fp32_model), dst)
        return QuantResult(dst, "fp32 reference (no conversion)")
    if precision == "int4":
        return _matmul_nbits(fp32_model, dst, 4, block_size, symmetric)
    if precision == "int8":
        try:
            return _matmul_nbits(fp32_model, dst, 8, block_size, symmetric)
        except (AssertionError, NotImplementedError, ValueError) as e:
            log.warning("MatMulNBits bits=8 unavailable in this onnxruntime (%s); using dynamic int8", e)
            return _dynamic_int8(fp32_model, dst, f"MatMulNBits bits=8 rejected: {e}")
    if precision == "fp16":
        return _fp16(fp32_model, dst)
    raise ExportError(f"unknown precision {precision!r}; choose int4, int8, fp16 or fp32")
