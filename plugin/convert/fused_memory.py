"""Resident-memory layout of the builder's int4 graph: what stays mapped, what onnxruntime copies at load.

Two rewrites of the graph the builder writes, both measured with `benchmarks/bench_vs_llamacpp.py`
(docs/fused-export.md has the numbers):

- **Untie the quantized embedding.** The builder ties the embedding to lm_head: GatherBlockQuantized
  reads `Reshape(lm_head weight)`. onnxruntime constant-folds that Reshape at every session start, so
  a heap copy of the whole 8-bit table (28 MB on the default model) sits beside lm_head's pre-packed
  weights. Here the embedding gets its own initializers instead: the same bytes appended once more to
  `model.onnx.data`, in the shape the Gather wants. onnxruntime memory-maps them, pages in only the
  rows of tokens it has seen, and can release lm_head's original tensors after pre-packing them.
- **fp32 compute for the MLP.** MatMulNBits at accuracy level 4 (int8 activations) pre-packs each
  4-bit weight with a per-block sum table, a quarter again the size of the 4-bit data; level 0 (fp32
  activations) packs without it. The gate/up and down projections hold three quarters of the layer
  weights. At level 0 they keep 20 MB less resident on the default model (219 vs 239 MB peak) for a
  fifth of the decode speed (226 vs 292 tok/s); attention projections stay at level 4.

Neither changes a weight value: the copy is byte-identical and both accuracy levels dequantize the
same 4-bit weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import numpy_helper

from plugin.convert.errors import ExportError
from plugin.convert.onnx_files import DATA_FILE, MODEL_FILE

log = logging.getLogger(__name__)

EMBEDDING_PREFIX = "model.embed_tokens.weight"
FP32_COMPUTE_MATMULS = ("gate_up_proj", "down_proj")  # 4-bit MatMulNBits named so run at accuracy level 0
ALIGN = 4096  # page-aligned offsets: onnxruntime maps each external tensor on its own


@dataclass(frozen=True)
class MemoryLayout:
    """What `apply_memory_layout` changed (recorded in the manifest's quantization entry)."""

    embedding_untied: bool
    fp32_compute_matmuls: int

    def to_dict(self) -> dict[str, object]:
        return {"embedding_untied": self.embedding_untied, "fp32_compute_matmuls": self.fp32_compute_matmuls}


def apply_memory_layout(folder: Path) -> MemoryLayout:
    """Rewrite `folder`'s model.onnx (and append to its data file); see the module docstring."""
    model_path = folder / MODEL_FILE
    model = onnx.load(str(model_path), load_external_data=False)
    untied = untie_quantized_embedding(model, folder / DATA_FILE)
    fp32 = set_fp32_compute(model, FP32_COMPUTE_MATMULS)
    if untied or fp32:
        tmp = model_path.with_name(model_path.name + ".tmp")
        onnx.save_model(model, str(tmp))  # graph only: every weight already points into the data file
        tmp.replace(model_path)
    layout = MemoryLayout(untied, fp32)
    log.info("memory layout: %s", layout)
    return layout


def untie_quantized_embedding(model: onnx.ModelProto, data_path: Path) -> bool:
    """Give a GatherBlockQuantized that reads `Reshape(initializer)` its own copies of data/scales/zero points.

    The copies are appended to `data_path` (page-aligned); the Reshape is dropped. Returns False when the
    graph has no such tied embedding (fp32 graphs, untied checkpoints).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    if len(gathers) != 1:
        return False
    gather = gathers[0]
    reshape = producers.get(gather.input[0])
    if reshape is None or reshape.op_type != "Reshape" or reshape.input[0] not in inits:
        return False
    shape = _constant_ints(reshape.input[1], inits, producers)
    weight = inits[reshape.input[0]]
    if shape is None or math.prod(shape) != math.prod(weight.dims):
        raise ExportError(f"the tied embedding's Reshape {reshape.name!r} has no constant shape matching its weight")

    copies = [(0, weight, "_q", shape), (2, inits[gather.input[2]], "_scale", list(inits[gather.input[2]].dims))]
    if len(gather.input) > 3 and gather.input[3]:
        zero_points = inits[gather.input[3]]
        copies.append((3, zero_points, "_zp", list(zero_points.dims)))
    with data_path.open("r+b") as data:
        for index, source, suffix, dims in copies:
            raw = _external_bytes(source, data)
            data.seek(0, 2)
            offset = data.tell()
            pad = -offset % ALIGN
            data.write(b"\0" * pad)
            data.write(raw)
            name = EMBEDDING_PREFIX + suffix
            graph.initializer.append(_external_tensor(name, source.data_type, dims, offset + pad, len(raw)))
            gather.input[index] = name
    graph.node.remove(reshape)
    _drop_unused_constant(graph, reshape.input[1])
    return True


def set_fp32_compute(model: onnx.ModelProto, name_parts: tuple[str, ...]) -> int:
    """Set accuracy_level 0 on the 4-bit MatMulNBits whose names contain one of `name_parts`; return the count."""
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not any(part in node.name for part in name_parts):
            continue
        attrs = {a.name: a for a in node.attribute}
        if attrs["bits"].i != 4:
            continue
        if "accuracy_level" in attrs:
            attrs["accuracy_level"].i = 0
        else:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", 0))
        changed += 1
    return changed


def _external_bytes(tensor: onnx.TensorProto, data: BinaryIO) -> bytes:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor).tobytes()
    info = {e.key: e.value for e in tensor.external_data}
    if info.get("location") != DATA_FILE:
        raise ExportError(f"tensor {tensor.name!r} lives in {info.get('location')!r}, not {DATA_FILE}")
    data.seek(int(info.get("offset", 0)))
    raw = data.read(int(info["length"]))
    if len(raw) != int(info["length"]):
        raise ExportError(f"{DATA_FILE} is shorter than tensor {tensor.name!r} says")
    return raw


def _external_tensor(name: str, data_type: int, dims: list[int], offset: int, length: int) -> onnx.TensorProto:
    # built by hand: onnx's set_external_data wants the bytes in raw_data first, and these are already on disk
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _constant_ints(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> list[int] | None:
    if name in inits:
        return numpy_helper.to_array(inits[name]).tolist()
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t).tolist()
    return None


def _drop_unused_constant(graph: onnx.GraphProto, name: str) -> None:
    if any(name in node.input for node in graph.node) or any(o.name == name for o in graph.output):
        return
    for node in list(graph.node):
        if node.op_type == "Constant" and name in node.output:
            graph.node.remove(node)
