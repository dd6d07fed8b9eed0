"""The four ONNX graphs of the decoder-pipeline package, written from a ModelSpec (fp32).

- embeddings (CPU): token ids -> hidden states; gpt2 adds its learned positions here, in fp32, from
  `past_seq_len`, so the HTP graphs stay free of integer index arithmetic.
- transformer (HTP), once with a static `1 x window` input (context) and once `1 x 1` (iterator): every
  decoder layer over static KV buffers `[1, kv_heads, context_length, head_dim]`, attention by
  com.microsoft GroupQueryAttention (rotary inside it, from cos/sin caches), which QNN compiles for HTP.
- lm_head (CPU): final norm + vocabulary projection in fp32. A tied head reads the embedding's own bytes
  (the two graphs share one external data file), so the large table is stored once.

Names (`past_keys_%d`, `past_seq_len`, ...) are those genai_config.json maps (config.py); the two
transformer graphs share initializer and tensor names, which lets quantize.py give them identical scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from plugin.convert.onnx_files import save_model
from plugin.convert.qnn.spec import LayerWeights, ModelSpec

OPSET = 21  # 16-bit and 4-bit QuantizeLinear/DequantizeLinear in the ONNX domain
IR_VERSION = 10
EMBEDDINGS = "embeddings.onnx"
LM_HEAD = "lm_head.onnx"
CONTEXT = "context.onnx"
ITERATOR = "iterator.onnx"
EMBED_DATA = "embeddings.onnx.data"

PAST_KEY, PAST_VALUE = "past_keys_%d", "past_values_%d"
PRESENT_KEY, PRESENT_VALUE = "present_keys_%d", "present_values_%d"
HIDDEN_IN, HIDDEN_OUT = "input_hidden_states", "output_hidden_states"


def transformer_io(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """Input and output names of both transformer graphs, in order."""
    ins = [HIDDEN_IN, "past_seq_len", "total_seq_len"]
    outs = [HIDDEN_OUT]
    for i in range(len(spec.layers)):
        ins += [PAST_KEY % i, PAST_VALUE % i]
        outs += [PRESENT_KEY % i, PRESENT_VALUE % i]
    return ins, outs


def _model(graph: onnx.GraphProto, contrib: bool = False) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    if contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="accelserve-qnn")
    model.ir_version = IR_VERSION
    return model


class _Graph:
    """Tiny node/initializer collector that names every node (QNN's refusals quote node names)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", n_out: int = 1, **attrs) -> list[str]:
        outs = [name] if n_out == 1 else [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        return self.op(op, inputs, name, **attrs)[0]


def _norm(g: _Graph, spec: ModelSpec, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
    if spec.norm == "rms":
        return g.one("SimplifiedLayerNormalization", [x, g.init(f"{name}.weight", w)], name, axis=-1, epsilon=spec.eps)
    bias = g.init(f"{name}.bias", b if b is not None else np.zeros_like(w))
    return g.one("LayerNormalization", [x, g.init(f"{name}.weight", w), bias], name, axis=-1, epsilon=spec.eps)


def _linear(g: _Graph, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
    y = g.one("MatMul", [x, g.init(f"{name}.weight", w)], f"{name}/MatMul")
    if b is not None:
        y = g.one("Add", [y, g.init(f"{name}.bias", b)], f"{name}/Add")
    return y


def _layer(g: _Graph, spec: ModelSpec, i: int, lw: LayerWeights, x: str) -> str:
    p = f"layers.{i}"
    h = _norm(g, spec, x, lw.norm1, lw.norm1_bias, f"{p}.input_norm")
    q = _linear(g, h, lw.wq, lw.bq, f"{p}.attn.q_proj")
    k = _linear(g, h, lw.wk, lw.bk, f"{p}.attn.k_proj")
    v = _linear(g, h, lw.wv, lw.bv, f"{p}.attn.v_proj")
    gqa_in = [q, k, v, PAST_KEY % i, PAST_VALUE % i, "past_seq_len", "total_seq_len"]
    rotary = {}
    if spec.cos is not None:
        gqa_in += ["rotary.cos", "rotary.sin"]
        rotary = {"do_rotary": 1, "rotary_interleaved": 0}
    g.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            gqa_in,
            [f"{p}.attn.gqa", PRESENT_KEY % i, PRESENT_VALUE % i],
            name=f"{p}.attn.gqa",
            domain="com.microsoft",
            num_heads=spec.heads,
            kv_num_heads=spec.kv_heads,
            **rotary,
        )
    )
    attn = f"{p}.attn.gqa"
    o = _linear(g, attn, lw.wo, lw.bo, f"{p}.attn.o_proj")
    x = g.one("Add", [x, o], f"{p}.attn.residual")
    h = _norm(g, spec, x, lw.norm2, lw.norm2_bias, f"{p}.post_attention_norm")
    if spec.activation == "silu_gated":
        gate = _linear(g, h, lw.w_gate, None, f"{p}.mlp.gate_proj")
        up = _linear(g, h, lw.w_up, None, f"{p}.mlp.up_proj")
        sig = g.one("Sigmoid", [gate], f"{p}.mlp.act/Sigmoid")
        act = g.one("Mul", [gate, sig], f"{p}.mlp.act/Mul")
        m = g.one("Mul", [act, up], f"{p}.mlp.gate_mul")
    else:
        up = _linear(g, h, lw.w_up, lw.b_up, f"{p}.mlp.fc")
        m = g.one("Gelu", [up], f"{p}.mlp.act", approximate="tanh")
    down = _linear(g, m, lw.w_down, lw.b_down, f"{p}.mlp.down_proj")
    return g.one("Add", [x, down], f"{p}.mlp.residual")


def transformer_graph(spec: ModelSpec, seq: int, context_length: int) -> onnx.ModelProto:
    """All decoder layers for a static `1 x seq` input over static KV buffers of `context_length`."""
    g = _Graph()
    if spec.cos is not None:
        g.init("rotary.cos", spec.cos[:context_length])
        g.init("rotary.sin", spec.sin[:context_length])
    x = HIDDEN_IN
    for i, lw in enumerate(spec.layers):
        x = _layer(g, spec, i, lw, x)
    g.nodes.append(helper.make_node("Identity", [x], [HIDDEN_OUT], name="output_hidden_states/Identity"))
    f = TensorProto.FLOAT
    kv = [1, spec.kv_heads, context_length, spec.head_dim]
    inputs = [
        helper.make_tensor_value_info(HIDDEN_IN, f, [1, seq, spec.hidden]),
        helper.make_tensor_value_info("past_seq_len", TensorProto.INT32, [1, 1]),
        helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, [1]),
    ]
    outputs = [helper.make_tensor_value_info(HIDDEN_OUT, f, [1, seq, spec.hidden])]
    for i in range(len(spec.layers)):
        inputs += [helper.make_tensor_value_info(n % i, f, kv) for n in (PAST_KEY, PAST_VALUE)]
        outputs += [helper.make_tensor_value_info(n % i, f, kv) for n in (PRESENT_KEY, PRESENT_VALUE)]
    graph = helper.make_graph(g.nodes, f"transformer_1x{seq}", inputs, outputs, g.inits)
    return _model(graph, contrib=True)


def embeddings_graph(spec: ModelSpec) -> onnx.ModelProto:
    """ids [1, seq] int32 -> hidden [1, seq, hidden]; gpt2 adds positions past_seq_len+1-seq .. past_seq_len."""
    g = _Graph()
    table = g.init("embed_tokens.weight", spec.embed)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, "seq"])]
    hidden = g.one("Gather", [table, "input_ids"], "embed_tokens/Gather")
    if spec.positions is not None:
        inputs.append(helper.make_tensor_value_info("past_seq_len", TensorProto.INT32, [1, 1]))
        # positions of a window's tokens: the last one is past_seq_len (genai's windowed inputs)
        shape = g.one("Shape", ["input_ids"], "positions/Shape", start=1, end=2)
        seq = g.one("Cast", [shape], "positions/Cast", to=TensorProto.INT32)
        zero, one = g.init("positions.zero", np.array(0, np.int32)), g.init("positions.one", np.array(1, np.int32))
        rng = g.one("Range", [zero, g.one("Squeeze", [seq], "positions/Squeeze"), one], "positions/Range")
        start = g.one("Sub", [g.one("Add", ["past_seq_len", one], "positions/Add1"), seq], "positions/Sub")
        pos = g.one("Add", [start, rng], "positions/Add")
        limit = g.init("positions.max", np.array(spec.positions.shape[0] - 1, np.int32))
        pos = g.one("Clip", [pos, zero, limit], "positions/Clip")
        pe = g.one("Gather", [g.init("embed_positions.weight", spec.positions), pos], "embed_positions/Gather")
        hidden = g.one("Add", [hidden, pe], "embeddings/Add")
    g.nodes.append(helper.make_node("Identity", [hidden], [HIDDEN_IN], name="input_hidden_states/Identity"))
    out = helper.make_tensor_value_info(HIDDEN_IN, TensorProto.FLOAT, [1, "seq", spec.hidden])
    return _model(helper.make_graph(g.nodes, "embeddings", inputs, [out], g.inits))


def lm_head_graph(spec: ModelSpec, table_name: str = "lm_head.weight") -> onnx.ModelProto:
    """hidden [1, seq, hidden] -> final norm -> logits [1, seq, vocab] (Gemm with transB: weight [vocab, hidden])."""
    g = _Graph()
    x = _norm(g, spec, HIDDEN_OUT, spec.final_norm, spec.final_norm_bias, "final_norm")
    flat = g.one("Reshape", [x, g.init("flat_shape", np.array([-1, spec.hidden], np.int64))], "lm_head/Flatten")
    g.init(table_name, spec.lm_head)
    logits = g.one("Gemm", [flat, table_name], "lm_head/Gemm", transB=1)
    shape = g.init("logits_shape", np.array([1, -1, spec.vocab], np.int64))
    g.nodes.append(helper.make_node("Reshape", [logits, shape], ["logits"], name="logits/Reshape"))
    inp = helper.make_tensor_value_info(HIDDEN_OUT, TensorProto.FLOAT, [1, "seq", spec.hidden])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", spec.vocab])
    return _model(helper.make_graph(g.nodes, "lm_head", [inp], [out], g.inits))


def write_cpu_graphs(spec: ModelSpec, folder: Path) -> None:
    """embeddings.onnx (+ .data) and lm_head.onnx; a tied lm_head points into the embedding's data file."""
    save_model(embeddings_graph(spec), folder / EMBEDDINGS)
    head = lm_head_graph(spec, "embed_tokens.weight" if spec.tied else "lm_head.weight")
    if spec.tied:
        saved = onnx.load(str(folder / EMBEDDINGS), load_external_data=False)
        table = next(t for t in saved.graph.initializer if t.name == "embed_tokens.weight")
        for i, t in enumerate(head.graph.initializer):
            if t.name == "embed_tokens.weight":
                head.graph.initializer[i].CopyFrom(table)  # external reference to embeddings.onnx.data
        onnx.save_model(head, str(folder / LM_HEAD), save_as_external_data=False)
        return
    save_model(head, folder / LM_HEAD)
