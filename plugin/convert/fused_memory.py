"""Resident-memory layout of the builder's int4 graph: what stays mapped, what onnxruntime copies at load.

Rewrites of the graph the builder writes, each measured with `benchmarks/bench_vs_llamacpp.py` and the
load-time RSS trace in docs/fused-export.md:

- **Untie the quantized embedding.** The builder ties the embedding to lm_head: GatherBlockQuantized
  reads `Reshape(lm_head weight)`. onnxruntime constant-folds that Reshape at every session start, so
  a heap copy of the whole 8-bit table (28 MB on the default model) sits beside lm_head's pre-packed
  weights. Here the embedding gets its own initializers instead: the same bytes appended once more to
  `model.onnx.data`, in the shape the Gather wants. onnxruntime memory-maps them, pages in only the
  rows of tokens it has seen, and can release lm_head's original tensors after pre-packing them.
- **Pre-pack lm_head first.** onnxruntime pre-packs weights node by node in the order the graph lists
  them and releases each original after packing it. lm_head comes last, so its 28 MB original and its
  35 MB packed copy were resident together on top of every other packed layer: the load's peak, 27-30 MB
  above the steady state. Listing the lm_head MatMul first moves that overlap to the start of the load,
  when nothing else is resident. Execution order is unchanged (onnxruntime sorts the graph itself); the
  file is no longer topologically sorted, which onnx.checker would flag, but no step here runs it.
- **Memory preset.** `fast` (the default) keeps every 4-bit MatMulNBits at int8 compute (accuracy level
  4), the fast CPU kernel, which also gives a row in a batch exactly what it gets alone. `lean` sets the
  MLP (gate/up and down projections, three quarters of the layer weights) to fp32 compute (level 0),
  which pre-packs without a per-block sum table: ~10 MB less resident for ~20 % of the decode speed.

The serving side (backends/ort_genai/resident.py) then returns the pages of `model.onnx.data` that
onnxruntime keeps mapped but no longer reads (the original scales and zero points beside their packed
copies, ~19 MB). None of this changes a weight value: the copy is byte-identical and both accuracy
levels dequantize the same 4-bit weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # imported where used: a process serving a cached export never loads onnx (~12 MB resident)
    import onnx

from plugin.convert.errors import ExportError
from plugin.convert.onnx_files import DATA_FILE, MODEL_FILE

log = logging.getLogger(__name__)

EMBEDDING_PREFIX = "model.embed_tokens.weight"
# preset -> the 4-bit MatMulNBits (by name part) that run at fp32 compute (accuracy level 0)
MEMORY_PRESETS: dict[str, tuple[str, ...]] = {"fast": (), "lean": ("gate_up_proj", "down_proj")}
DEFAULT_MEMORY_PRESET = "fast"
LM_HEAD_PART = "lm_head"
ALIGN = 4096  # page-aligned offsets: onnxruntime maps each external tensor on its own


@dataclass(frozen=True)
class MemoryLayout:
    """What `apply_memory_layout` changed (recorded in the manifest's quantization entry)."""

    embedding_untied: bool
    fp32_compute_matmuls: int
    preset: str = DEFAULT_MEMORY_PRESET
    lm_head_prepacked_first: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "preset": self.preset,
            "embedding_untied": self.embedding_untied,
            "fp32_compute_matmuls": self.fp32_compute_matmuls,
            "lm_head_prepacked_first": self.lm_head_prepacked_first,
        }


def check_memory_preset(preset: str) -> tuple[str, ...]:
    """The fp32-compute name parts of `preset`; ExportError naming the choices for an unknown one."""
    if preset not in MEMORY_PRESETS:
        raise ExportError(
            f"unknown memory preset {preset!r}; choose one of {', '.join(MEMORY_PRESETS)} "
            "('fast': int8 compute everywhere, the default; 'lean': fp32-compute MLP, ~10 MB less, ~20 % slower)"
        )
    return MEMORY_PRESETS[preset]


def apply_memory_layout(folder: Path, preset: str = DEFAULT_MEMORY_PRESET) -> MemoryLayout:
    """Rewrite `folder`'s model.onnx (and append to its data file); see the module docstring."""
    import onnx

    fp32_parts = check_memory_preset(preset)
    model_path = folder / MODEL_FILE
    model = onnx.load(str(model_path), load_external_data=False)
    untied = untie_quantized_embedding(model, folder / DATA_FILE)
    fp32 = set_fp32_compute(model, fp32_parts)
    first = list_lm_head_first(model)
    if untied or fp32 or first:
        tmp = model_path.with_name(model_path.name + ".tmp")
        onnx.save_model(model, str(tmp))  # graph only: every weight already points into the data file
        tmp.replace(model_path)
    layout = MemoryLayout(untied, fp32, preset, first)
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
    import onnx

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


def list_lm_head_first(model: onnx.ModelProto) -> bool:
    """Move the lm_head MatMul (a node named lm_head whose weight is an initializer) to the front of the graph.

    onnxruntime pre-packs in this order and frees each original after packing it, so the largest weight's
    original and packed copies are resident together before the other layers are packed, not after.
    Returns False when there is no such node or it is already first.
    """
    import onnx

    graph = model.graph
    inits = {t.name for t in graph.initializer}
    heads = [
        i
        for i, n in enumerate(graph.node)
        if n.op_type in ("MatMulNBits", "MatMul") and LM_HEAD_PART in n.name and n.input[1:2] and n.input[1] in inits
    ]
    if len(heads) != 1 or heads[0] == 0:
        return False
    node = onnx.NodeProto()
    node.CopyFrom(graph.node[heads[0]])
    del graph.node[heads[0]]
    graph.node.insert(0, node)
    return True


def _external_bytes(tensor: onnx.TensorProto, data: BinaryIO) -> bytes:
    import onnx
    from onnx import numpy_helper

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
    import onnx

    # built by hand: onnx's set_external_data wants the bytes in raw_data first, and these are already on disk
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _constant_ints(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> list[int] | None:
    from onnx import numpy_helper

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
