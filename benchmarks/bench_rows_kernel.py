"""The rows kernel against onnxruntime's MatMulNBits: per-op time by rows, and the model's top-1 agreement with torch.

    python benchmarks/bench_rows_kernel.py                 # the default model's int4 CPU export
    python benchmarks/bench_rows_kernel.py --rows 1 8 --runs 100

1. Per op: one single-node graph per distinct (K, N, bits, block) of the export's int8-compute MatMulNBits
   (random weights of the same format: time does not depend on values), run side by side on onnxruntime's
   MatMulNBits and on the rows kernel for each row count (decode steps of 1..16 rows, a 57-token prefill),
   alternating in blocks of 25 calls, medians over --runs. Also the whole-step estimate: each shape's time x
   its count in the graph.
2. Model: top-1 agreement with torch's fp32 logits, teacher-forced over the export's own parity prompts
   (plugin/convert/parity.py: every position of prompt + 8 greedy tokens, one token per step), for the batched
   runner's session on onnxruntime's kernels and on the rows kernel.
Writes benchmarks/results/rows_kernel.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.ort_genai import kernels  # noqa: E402
from benchmarks.common import machine_info, write_json  # noqa: E402

log = logging.getLogger("bench_rows_kernel")
BLOCK = 25  # consecutive runs of one session


def export_shapes(model_file: Path) -> collections.Counter:
    """(K, N, bits, block) -> how many int8-compute MatMulNBits of that shape the graph has."""
    import onnx

    from backends.ort_genai.kernels.rewrite import qualifies

    model = onnx.load(str(model_file), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    shapes: collections.Counter = collections.Counter()
    for node in model.graph.node:
        if qualifies(node, initializers):
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            shapes[(a["K"], a["N"], a.get("bits", 4), a["block_size"])] += 1
    return shapes


def op_sessions(K: int, N: int, bits: int, block: int, library: Path) -> tuple[Any, Any]:
    """(onnxruntime's MatMulNBits, the rows kernel) on the same random weights with zero points."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = -(-K // block)
    packed = rng.integers(0, 256, size=(N, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(N * blocks, dtype=np.float32) * 0.02).astype(np.float32)
    zp = rng.integers(0, 256, size=N * (-(-blocks // 2) if bits == 4 else blocks), dtype=np.uint8)
    inits = [
        numpy_helper.from_array(packed, "B"),
        numpy_helper.from_array(scales, "s"),
        numpy_helper.from_array(zp, "z"),
    ]

    def session(op: str, domain: str, extra: dict[str, int], lib: Path | None) -> Any:
        node = helper.make_node(
            op, ["A", "B", "s", "z"], ["Y"], domain=domain, K=K, N=N, bits=bits, block_size=block, **extra
        )
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", K])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", N])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        if lib is not None:
            options.register_custom_ops_library(str(lib))
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    return (
        session("MatMulNBits", "com.microsoft", {"accuracy_level": 4}, None),
        session(kernels.OP_TYPE, kernels.DOMAIN, {}, library),
    )


def time_ops(shapes: collections.Counter, rows: list[int], runs: int, library: Path) -> list[dict[str, Any]]:
    out = []
    for (K, N, bits, block), count in sorted(shapes.items()):
        mlas, mine = op_sessions(K, N, bits, block, library)
        for m in rows:
            a = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
            times: dict[str, list[float]] = {"onnxruntime": [], "rows": []}
            for _ in range(10):
                mlas.run(None, {"A": a})
                mine.run(None, {"A": a})
            # alternate in blocks so drift hits both, but never call one session while the other's intra-op
            # threads still spin (onnxruntime spins after each run: alternating every call measures the overlap)
            for _ in range(max(1, runs // BLOCK)):
                for name, s in (("onnxruntime", mlas), ("rows", mine)):
                    s.run(None, {"A": a})  # after the other session's threads have gone to sleep
                    for _ in range(BLOCK):
                        t = time.perf_counter()
                        s.run(None, {"A": a})
                        times[name].append(time.perf_counter() - t)
            ort_us = statistics.median(times["onnxruntime"]) * 1e6
            rows_us = statistics.median(times["rows"]) * 1e6
            out.append(
                {"K": K, "N": N, "bits": bits, "block": block, "count": count, "rows": m, "onnxruntime_us": ort_us,
                 "rows_us": rows_us, "speedup": ort_us / rows_us}
            )  # fmt: skip
    return out


def teacher_forced_logits(session: Any, seq: list[int], kv_heads: int, head_size: int) -> np.ndarray:
    """Logits after each token of `seq`, fed one token per step (the export's lm_head is pruned to the last
    position), the cache grown by concatenation (no shared buffer needed for a plain run)."""
    past = sorted(i.name for i in session.get_inputs() if i.name.startswith("past_key_values."))
    kv = {n: np.zeros((1, kv_heads, 0, head_size), dtype=np.float32) for n in past}
    outputs = [o.name for o in session.get_outputs()]
    rows = []
    for i, token in enumerate(seq):
        feed = {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": np.ones((1, i + 1), dtype=np.int64)}
        feed.update(kv)
        result = dict(zip(outputs, session.run(None, feed), strict=True))
        rows.append(result["logits"].reshape(-1))
        kv = {n: result[n.replace("past_key_values", "present")] for n in past}
    return np.stack(rows)


def agreement(folder: Path, source: Path, library: Path | None) -> dict[str, Any]:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from plugin.convert.parity import PROMPTS, _torch_side

    tok = AutoTokenizer.from_pretrained(source)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    seqs, torch_logits = _torch_side(source, prompt_ids)
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    geometry = (decoder["num_key_value_heads"], decoder["head_size"])
    result: dict[str, Any] = {}
    for name, lib in (("onnxruntime", None), ("rows", library)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        if lib is None:
            session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        else:
            retyped, _ = kernels.rows_graph(folder / "model.onnx")
            if retyped is None:
                raise RuntimeError(f"{folder} has no int8-compute MatMulNBits for the rows kernel: export int4")
            session = kernels.open_retyped_session(lib, retyped, folder, options)
        agree = total = 0
        for seq, ref in zip(seqs, torch_logits, strict=True):
            got = teacher_forced_logits(session, seq, *geometry)
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
        result[name] = {"top1_agreement": round(agree / total, 4), "positions": total}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or an int4 export folder")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 57])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--no-agreement", dest="agreement", action="store_false")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "rows_kernel.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from rich.console import Console
    from rich.table import Table

    kernel = kernels.rows_kernel()
    if kernel.library is None:
        parser.error(f"the rows kernel is not available here: {kernel.reason}")
    from plugin.convert import export
    from plugin.models.resolve import resolve_model

    source = None
    folder = Path(args.model)
    if not (folder / "genai_config.json").is_file():
        source = Path(resolve_model(args.model).path)
        folder = export(str(source), target="cpu", precision="int4").path
    console = Console()
    load_before = list(os.getloadavg())
    shapes = export_shapes(folder / "model.onnx")
    ops = time_ops(shapes, args.rows, args.runs, kernel.library)
    table = Table(title=f"{folder.name}: per-op median us, onnxruntime MatMulNBits vs rows kernel, 2 threads")
    for col in ("K x N, bits", "in graph", *[f"{m} rows" for m in args.rows]):
        table.add_column(col)
    for shape in sorted(shapes):
        cells = [r for r in ops if (r["K"], r["N"], r["bits"], r["block"]) == shape]
        label = f"{shape[0]} x {shape[1]}, {shape[2]}-bit"
        table.add_row(label, str(shapes[shape]), *[f"{r['onnxruntime_us']:.0f} / {r['rows_us']:.0f}" for r in cells])
    per_step = {}
    for m in args.rows:
        cells = [r for r in ops if r["rows"] == m]
        ort_ms = sum(r["onnxruntime_us"] * r["count"] for r in cells) / 1000
        rows_ms = sum(r["rows_us"] * r["count"] for r in cells) / 1000
        per_step[str(m)] = {"onnxruntime_ms": ort_ms, "rows_ms": rows_ms, "speedup": ort_ms / rows_ms}
    table.add_row(
        "all (x count), ms",
        "",
        *[f"{per_step[str(m)]['onnxruntime_ms']:.2f} / {per_step[str(m)]['rows_ms']:.2f}" for m in args.rows],
    )
    console.print(table)
    base = per_step[str(args.rows[0])]
    for m in args.rows:
        s = per_step[str(m)]
        console.print(
            f"{m:>3} rows: all quantized MatMuls {s['onnxruntime_ms'] / base['onnxruntime_ms']:.2f}x one row's on "
            f"onnxruntime, {s['rows_ms'] / base['rows_ms']:.2f}x on the rows kernel; "
            f"rows kernel {s['speedup']:.2f}x faster"
        )
    agreement_result = None
    if args.agreement and source is not None:
        agreement_result = agreement(folder, source, kernel.library)
        for name, r in agreement_result.items():
            console.print(
                f"top-1 agreement with torch ({name} kernels): {r['top1_agreement']:.4f} over {r['positions']}"
            )
    load_after = list(os.getloadavg())
    write_json(
        args.output,
        {
            "machine": machine_info(),
            "export": str(folder),
            "shapes": {f"{k}x{n}x{b}bit/blk{blk}": c for (k, n, b, blk), c in shapes.items()},
            "ops": ops,
            "per_step": per_step,
            "agreement": agreement_result,
            "load_avg_before": load_before,
            "load_avg_after": load_after,
        },
    )
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
