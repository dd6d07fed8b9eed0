"""The fused graph: onnxruntime-genai's model builder as a library step behind Optimum's checks.

The plain Optimum graph (TorchScript export + MatMulNBits) decodes at about 40 % of the speed of the
same weights in a graph built from ORT's contrib ops: GroupQueryAttention over one shared past/present
KV buffer, RotaryEmbedding inside it, (Skip)SimplifiedLayerNormalization, packed QKV and gate/up MatMulNBits, a
quantized embedding (GatherBlockQuantized) holding lm_head's 8-bit values, and lm_head applied to the last
position only. onnxruntime-genai's builder writes exactly that graph from the HF checkpoint we already have
on disk, so this module runs it (in a child process, see builder_worker.py) instead of re-implementing the
fusions; fused_memory.py then lays the weights out for a smaller resident set. The comparison of the candidates
(dynamo + onnxscript fusions, rewriting the Optimum graph, the builder) is in docs/fused-export.md.

Optimum stays the front door: the architecture must be one Optimum exports for text-generation-with-past
(its TasksManager configs), the tokenizer/config files are the same as for the plain path, and the result
passes the same parity check against torch. Anything the fused path cannot take falls back to the plain
Optimum graph with the reason logged and written into the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plugin.convert.errors import ExportError
from plugin.convert.fused_memory import DEFAULT_MEMORY_PRESET, apply_memory_layout, check_memory_preset
from plugin.convert.onnx_files import DATA_FILE, MODEL_FILE
from plugin.convert.steps import StepTimer

log = logging.getLogger(__name__)

GRAPHS = ("auto", "fused", "plain")
FUSED_TARGETS = ("npu", "cpu")
FUSED_PRECISIONS = ("int4", "fp32")
# int4 weights: block-wise symmetric 4-bit everywhere except the last MatMul (lm_head, and with it the
# embedding), which is 8-bit. An all-4-bit lm_head agrees with torch's top-1 less often than the
# plain export does on the default model (measured: docs/fused-export.md); the 8-bit one agrees more.
INT4_ALGO = "k_quant_last"
FUSED_FORMAT = 4  # bump when the builder options or fused_memory change what a fused folder holds
BUILDER_TIMEOUT_S = 3600.0
FUSED_OPS = (
    "GroupQueryAttention",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "MatMulNBits",
    "GatherBlockQuantized",
)


@dataclass(frozen=True)
class GraphChoice:
    """What `export()` asked for and what was built, with the reason when they differ (manifest `graph`)."""

    requested: str
    built: str
    builder: str | None = None
    fused_ops: dict[str, int] = field(default_factory=dict)
    fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_graph(graph: str, target: str, precision: str) -> str:
    """The graph to build: "auto" is fused for int4/fp32 on cpu/npu targets, plain elsewhere.

    An explicit "fused" for a target/precision the fused path never builds is refused (the fix is named);
    architectures it cannot take fall back later, when the checkpoint's config is known.
    """
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    fused_ok = target in FUSED_TARGETS and precision in FUSED_PRECISIONS
    if graph == "auto":
        return "fused" if fused_ok else "plain"
    if graph == "fused" and not fused_ok:
        raise ExportError(
            f"graph='fused' is built for targets {', '.join(FUSED_TARGETS)} at {', '.join(FUSED_PRECISIONS)} "
            f"(got target {target!r}, precision {precision!r}); use graph='plain' or graph='auto'"
        )
    return graph


def graph_key_options(graph: str, precision: str, memory: str = DEFAULT_MEMORY_PRESET) -> dict[str, Any]:
    """Cache-key options for the graph choice: the graph, and for fused int4 the quantization and memory presets."""
    options: dict[str, Any] = {"graph": graph}
    if graph == "fused":
        options["fused_format"] = FUSED_FORMAT
        if precision == "int4":
            options["int4_algorithm"] = INT4_ALGO
            options["memory_preset"] = memory
            options["fp32_compute"] = list(check_memory_preset(memory))
    return options


def fused_unsupported_reason(hf_config: dict[str, Any]) -> str | None:
    """Why the fused builder cannot take this checkpoint (None = it can); the lookup is architectures.py's."""
    from plugin.convert.architectures import fused_graph_reason, optimum_unsupported_reason

    reason = optimum_unsupported_reason(str(hf_config.get("model_type", ""))) or fused_graph_reason(hf_config)
    if reason:
        return reason
    if hf_config.get("quantization_config"):
        return "the checkpoint is pre-quantized (quantization_config); the fused step starts from float weights"
    return None


def builder_options(precision: str, block_size: int, symmetric: bool) -> dict[str, str]:
    """The builder's extra options for `precision` (strings, as its CLI takes them).

    gate and up projections are packed into one MatMul (QKV always is): one weight read and kernel
    launch less per layer. lm_head runs on the last position only (prune_lm_head): prefill needs no
    [prompt, vocab] logits buffer, and onnxruntime-genai only ever samples from the last row.
    """
    packed = {"fuse_mlp_gate_up": "true", "prune_lm_head": "true"}
    if precision != "int4":
        return packed
    return {
        **packed,
        "block_size": str(block_size),
        "is_symmetric": str(symmetric).lower(),
        "accuracy_level": "4",  # int8 activations inside MatMulNBits: the fast CPU kernel
        "algo_config": INT4_ALGO,
    }


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def run_builder(source: Path, output: Path, precision: str, options: dict[str, str]) -> Path:
    """Run builder_worker in a child process; return the folder it wrote. Raises ExportError with its log."""
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "builder.log"
    args = {
        "source": str(source),
        "output": str(output / "out"),
        "precision": precision,
        "options": options,
        "cache_dir": str(output / "cache"),
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_project_root()), env.get("PYTHONPATH")) if p)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    cmd = [sys.executable, "-m", "plugin.convert.builder_worker", json.dumps(args)]
    with log_path.open("w", encoding="utf-8") as logf:
        try:
            proc = subprocess.run(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=BUILDER_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise ExportError(f"the fused builder step took longer than {BUILDER_TIMEOUT_S:.0f}s") from e
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-6:]
        raise ExportError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}): {' | '.join(tail)}")
    out = output / "out"
    missing = [n for n in (MODEL_FILE, DATA_FILE, "genai_config.json") if not (out / n).is_file()]
    if missing:
        raise ExportError(f"onnxruntime-genai's model builder finished without writing {', '.join(missing)}")
    return out


def fused_op_counts(model_path: Path) -> dict[str, int]:
    """How many of each fused contrib op the graph holds (read without weights)."""
    import onnx  # here, not at the top: a process serving a cached export never loads onnx

    model = onnx.load(str(model_path), load_external_data=False)
    counts = Counter(n.op_type for n in model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def check_fused(ops: dict[str, int], num_layers: int) -> None:
    """Refuse a graph without one GroupQueryAttention per layer (the fusion this path exists for)."""
    gqa = ops.get("GroupQueryAttention", 0)
    if gqa != num_layers:
        raise ExportError(f"the builder's graph has {gqa} GroupQueryAttention ops for {num_layers} layers; not fused")


def _quantization_record(
    precision: str, options: dict[str, str], ops: dict[str, int], layout: dict[str, Any], memory: str
) -> dict[str, Any]:
    if precision != "int4":
        return {"method": "fp32 reference (no conversion), fused by onnxruntime-genai's model builder"}
    return {
        "method": (
            f"MatMulNBits bits=4 weight-only ({INT4_ALGO}: lm_head and embedding 8-bit), "
            "onnxruntime-genai model builder"
        ),
        "bits": 4,
        "block_size": int(options["block_size"]),
        "symmetric": options["is_symmetric"] == "true",
        "accuracy_level": int(options["accuracy_level"]),
        "memory_preset": memory,
        "fp32_compute": list(check_memory_preset(memory)),  # these 4-bit MatMuls run at accuracy_level 0
        "algorithm": INT4_ALGO,
        "quantized_matmuls": ops.get("MatMulNBits", 0),
        "memory_layout": layout,
    }


def build_fused(
    source: Path, folder: Path, precision: str, block_size: int, symmetric: bool, memory: str = DEFAULT_MEMORY_PRESET
) -> tuple[dict[str, Any], dict[str, int]]:
    """Write model.onnx(+.data) and genai_config.json of the fused graph into `folder`.

    `memory`: the fused_memory preset ("fast" int8 compute everywhere, "lean" fp32-compute MLP); it only
    changes accuracy levels of 4-bit MatMuls, so an fp32 graph is the same under both.

    Returns (quantization record, fused op counts). The tokenizer files are copied by the caller, as for
    the plain graph. Raises ExportError when the builder fails or its graph is not fused.
    """
    options = builder_options(precision, block_size, symmetric)
    work = folder / ".builder"
    out = run_builder(source, work, precision, options)
    hf_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    ops = fused_op_counts(out / MODEL_FILE)  # the layout rewrite below keeps every fused op
    check_fused(ops, int(hf_config.get("num_hidden_layers", -1)))
    layout = apply_memory_layout(out, memory)
    for name in (MODEL_FILE, DATA_FILE, "genai_config.json"):
        shutil.move(out / name, folder / name)
    shutil.rmtree(work)
    log.info("fused graph (%s): %s", builder_name(), ops)
    return _quantization_record(precision, options, ops, layout.to_dict(), memory), ops


def builder_name() -> str:
    from importlib import metadata

    return f"onnxruntime-genai {metadata.version('onnxruntime-genai')} model builder"


def try_build_fused(
    source: Path,
    folder: Path,
    target: str,
    precision: str,
    block_size: int,
    symmetric: bool,
    timer: StepTimer,
    provider_options: Callable[[str, str], tuple[list[dict[str, Any]], str]],
    memory: str = DEFAULT_MEMORY_PRESET,
) -> tuple[dict[str, Any] | None, str | None]:
    """Fill `folder` with the fused export (minus manifest); (manifest fields, None) on success.

    (None, reason) when the checkpoint or the builder cannot give a fused graph: the caller then builds
    the plain Optimum graph, and the reason is logged here and recorded in the manifest.
    """
    from plugin.convert.tokenizer_files import copy_tokenizer

    hf_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    reason = fused_unsupported_reason(hf_config)
    if reason is None:
        try:
            with timer.step("fused_build", f"fused ONNX graph ({builder_name()}, {precision})"):
                quantization, ops = build_fused(source, folder, precision, block_size, symmetric, memory)
        except ExportError as e:
            reason = str(e)
            for name in (MODEL_FILE, DATA_FILE, "genai_config.json"):
                (folder / name).unlink(missing_ok=True)
            shutil.rmtree(folder / ".builder", ignore_errors=True)
    if reason is not None:
        log.warning("fused graph not built for %s (%s); exporting the plain Optimum graph", source, reason)
        return None, reason
    with timer.step("genai_config", "tokenizer + genai_config.json"):
        copy_tokenizer(source, folder)
        options, provider = provider_options(target, precision)
        config_path = folder / "genai_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["model"]["decoder"].setdefault("session_options", {})["provider_options"] = options
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    choice = GraphChoice("fused", "fused", builder_name(), ops)
    return {"quantization": quantization, "config_provider": provider, "graph": choice.to_dict()}, None
