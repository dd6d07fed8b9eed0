"""Retype a graph's int8-compute MatMulNBits nodes to the rows kernel: `python -m ... SRC DST`, prints the count.

Only nodes the kernel computes in the same numerics class are retyped: accuracy_level 4 (int8 compute),
bits 4 or 8, a power-of-two block in [16, 256], float A and scales, B / scales / zero points stored as
initializers, no g_idx or bias. The weights stay in the original external data file (the copy references it
by the same relative name and is loaded with that folder), so nothing is duplicated on disk.
"""

from __future__ import annotations

import sys

import onnx
from onnx import TensorProto, helper

from backends.ort_genai.kernels import DOMAIN, OP_TYPE

KEPT_ATTRIBUTES = ("K", "N", "bits", "block_size")


def qualifies(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    block = attrs.get("block_size", 0)
    if attrs.get("accuracy_level") != 4 or attrs.get("bits", 4) not in (4, 8):
        return False
    if block < 16 or block > 256 or block & (block - 1):
        return False
    inputs = list(node.input)
    if len(inputs) < 3 or any(name for name in inputs[4:]):  # g_idx, bias
        return False
    weights = [name for name in inputs[1:4] if name]
    if not all(name in initializers for name in weights):
        return False
    return initializers[inputs[2]].data_type == TensorProto.FLOAT


def retype(model: onnx.ModelProto) -> int:
    initializers = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if not qualifies(node, initializers):
            continue
        kept = [a for a in node.attribute if a.name in KEPT_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(kept)
        del node.input[4:]
        while node.input and not node.input[-1]:  # an empty name is an absent optional input (zero points)
            node.input.pop()
        node.op_type, node.domain = OP_TYPE, DOMAIN
        count += 1
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count


def main(src: str, dst: str) -> None:
    model = onnx.load(src, load_external_data=False)
    count = retype(model)
    if count:
        onnx.save(model, dst)
    print(count)


if __name__ == "__main__":
    main(*sys.argv[1:3])
