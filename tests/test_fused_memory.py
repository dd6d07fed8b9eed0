"""fused_memory: the untied embedding gathers the same values; accuracy levels change only where named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from plugin.convert.errors import ExportError
from plugin.convert.fused_memory import ALIGN, apply_memory_layout, set_fp32_compute, untie_quantized_embedding
from plugin.convert.onnx_files import DATA_FILE, MODEL_FILE, save_model

VOCAB, HIDDEN, BLOCK = 64, 32, 16


def _tied_graph(folder: Path, shape: list[int] | None = None) -> None:
    """lm_head-style 8-bit weight [vocab, blocks, block] read by GatherBlockQuantized through a Reshape."""
    rng = np.random.default_rng(0)
    weight = rng.integers(0, 256, size=(VOCAB, HIDDEN // BLOCK, BLOCK), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(VOCAB, HIDDEN // BLOCK)).astype(np.float32)
    zero_points = rng.integers(100, 156, size=(VOCAB, HIDDEN // BLOCK), dtype=np.uint8)
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array(shape or [VOCAB, HIDDEN]))),
        helper.make_node("Reshape", ["lm_head_q", "shape"], ["table"]),
        helper.make_node(
            "GatherBlockQuantized",
            ["table", "ids", "lm_head_scale", "lm_head_zp"],
            ["embeds"],
            domain="com.microsoft",
            bits=8,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=1,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, [1, "s", HIDDEN])],
        [
            numpy_helper.from_array(weight, "lm_head_q"),
            numpy_helper.from_array(scales, "lm_head_scale"),
            numpy_helper.from_array(zero_points, "lm_head_zp"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    save_model(model, folder / MODEL_FILE)


def _embeds(folder: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    return session.run(["embeds"], {"ids": ids})[0]


def test_untied_embedding_gathers_the_same_values(tmp_path):
    _tied_graph(tmp_path)
    ids = np.array([[0, 5, 63, 17, 5]], dtype=np.int64)
    before = _embeds(tmp_path, ids)
    size_before = (tmp_path / DATA_FILE).stat().st_size

    layout = apply_memory_layout(tmp_path)

    assert layout.embedding_untied is True and layout.fp32_compute_matmuls == 0
    np.testing.assert_array_equal(_embeds(tmp_path, ids), before)
    graph = onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False).graph
    assert [n.op_type for n in graph.node] == ["GatherBlockQuantized"]  # Reshape and its shape Constant gone
    gather = graph.node[0]
    assert list(gather.input) == [
        "model.embed_tokens.weight_q",
        "ids",
        "model.embed_tokens.weight_scale",
        "model.embed_tokens.weight_zp",
    ]
    added = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer if "embed" in t.name}
    assert all(int(info["offset"]) % ALIGN == 0 and info["location"] == DATA_FILE for info in added.values())
    assert (tmp_path / DATA_FILE).stat().st_size > size_before  # appended, the lm_head bytes left in place
    table = next(t for t in graph.initializer if t.name == "model.embed_tokens.weight_q")
    assert list(table.dims) == [VOCAB, HIDDEN]


def test_graph_without_tied_embedding_is_left_alone(tmp_path):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "plain",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )
    (tmp_path / DATA_FILE).write_bytes(b"")
    assert untie_quantized_embedding(model, tmp_path / DATA_FILE) is False
    assert set_fp32_compute(model, ("down_proj",)) == 0


def test_reshape_that_does_not_match_the_weight_is_refused(tmp_path):
    _tied_graph(tmp_path, shape=[VOCAB, HIDDEN * 2])
    model = onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False)
    with pytest.raises(ExportError, match="no constant shape matching its weight"):
        untie_quantized_embedding(model, tmp_path / DATA_FILE)


def test_fp32_compute_touches_only_named_4bit_matmuls():
    def matmul(name: str, bits: int) -> onnx.NodeProto:
        return helper.make_node(
            "MatMulNBits",
            ["a", "b", "s"],
            [name + "_out"],
            name=name,
            domain="com.microsoft",
            bits=bits,
            block_size=32,
            K=32,
            N=32,
            accuracy_level=4,
        )

    nodes = [
        matmul("/model/layers.0/mlp/down_proj/MatMul_Q4", 4),
        matmul("/model/layers.0/attn/o_proj", 4),
        matmul("/lm_head/down_proj_like", 8),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    assert set_fp32_compute(model, ("down_proj",)) == 1
    levels = [next(a.i for a in n.attribute if a.name == "accuracy_level") for n in model.graph.node]
    assert levels == [0, 4, 4]
