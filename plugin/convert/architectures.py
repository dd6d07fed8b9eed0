"""Which architectures export() serves, computed from the installed libraries instead of a hand-written list.

- Candidates: every `model_type` Optimum's TasksManager exports for text-generation-with-past.
- Graph: "fused" when onnxruntime-genai's model builder dispatches on the checkpoint's class (the class
  names are read from the builder's own source, `builder.py`, so a new builder version adds its own),
  "plain" (the Optimum graph + a genai_config written from it) otherwise.
- Refusals: what the config alone says cannot work (no transformers class, so only remote code could
  build it), plus what was found by trying: `benchmarks/arch_coverage.py` exports a tiny random
  checkpoint of every candidate and records fp32 greedy parity, int4 agreement and each failure in
  `architectures_measured.json`. That record applies only to the library versions it was measured with;
  under other versions an architecture is "unmeasured" and export() tries it (the fp32 parity check
  still refuses a graph that does not reproduce torch, and nothing half-built is kept).
"""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata, util
from pathlib import Path
from typing import Any

from plugin.convert.errors import ExportError
from plugin.convert.library_facts import TASK, library_facts

log = logging.getLogger(__name__)

MEASURED_FILE: Path | None = Path(__file__).with_name("architectures_measured.json")
# The libraries whose behaviour the measured record describes; another version of any makes it stale.
MEASURED_VERSIONS = ("optimum", "optimum-onnx", "onnxruntime", "onnxruntime-genai", "transformers")
FUSED_PRECISIONS = ("int4", "fp32")
PLAIN_PRECISIONS = ("int4", "int8", "fp16", "fp32")
NPU_PRECISIONS = ("int4", "int8")


@dataclass(frozen=True)
class ArchitectureSupport:
    """One row of the support table (`accelserve models --supported`, docs/architectures.md)."""

    model_type: str
    hf_class: str | None  # transformers' causal-LM class for it (None: only remote code has one)
    graph: str  # "fused" | "plain" | "-" (refused)
    status: str  # "served" (measured exact fp32 parity) | "unmeasured" | "refused"
    precisions: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    reason: str | None = None  # why refused, or why plain although the builder knows the class
    npu_reason: str | None = None  # why the QNN HTP pipeline cannot take it (None: it can)
    measured: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def optimum_model_types() -> tuple[str, ...]:
    """model_types Optimum's ONNX exporter exports for text-generation-with-past (its TasksManager)."""
    return library_facts().optimum_types


def optimum_unsupported_reason(model_type: str) -> str | None:
    """Why Optimum's ONNX exporter does not take `model_type` for text-generation-with-past (None = it does)."""
    if model_type in optimum_model_types():
        return None
    return (
        f"Optimum's ONNX exporter (optimum-onnx {_version('optimum-onnx')}) does not export {model_type!r} for {TASK}"
    )


@lru_cache(maxsize=1)
def builder_classes() -> frozenset[str]:
    """Checkpoint classes onnxruntime-genai's model builder builds: the `config.architectures[0] == "..."`
    tests in its `builder.py`, read as source (importing the builder changes sys.path; see builder_worker)."""
    spec = util.find_spec("onnxruntime_genai")
    if spec is None or spec.origin is None:
        return frozenset()
    path = Path(spec.origin).parent / "models" / "builder.py"
    if not path.is_file():
        log.warning("onnxruntime-genai has no models/builder.py; no architecture gets the fused graph")
        return frozenset()
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Compare) and len(node.comparators) == 1 and isinstance(node.ops[0], ast.Eq)):
            continue
        left, right = node.left, node.comparators[0]
        if (
            isinstance(left, ast.Subscript)
            and isinstance(left.value, ast.Attribute)
            and left.value.attr == "architectures"
            and isinstance(right, ast.Constant)
            and isinstance(right.value, str)
        ):
            names.add(right.value)
    return frozenset(names)


def causal_lm_class(model_type: str) -> str | None:
    """transformers' class for `model_type` as Optimum loads it for text generation (None: none in transformers)."""
    return library_facts().causal_lm_classes.get(model_type)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def installed_versions() -> dict[str, str]:
    return {d: _version(d) for d in MEASURED_VERSIONS}


def measured_record() -> dict[str, dict[str, Any]]:
    """The coverage measurement for the installed library versions (empty when absent or stale)."""
    if MEASURED_FILE is None or not MEASURED_FILE.is_file():
        return {}
    data = json.loads(MEASURED_FILE.read_text(encoding="utf-8"))
    if data.get("versions") != installed_versions():
        log.info(
            "architecture measurements were taken with %s; installed: %s", data.get("versions"), installed_versions()
        )
        return {}
    return dict(data.get("architectures", {}))


def config_refusal(model_type: str) -> str | None:
    """A refusal the libraries' metadata alone decides (before anything is built)."""
    reason = optimum_unsupported_reason(model_type)
    if reason:
        return reason
    if causal_lm_class(model_type) is None:
        return (
            f"transformers {_version('transformers')} has no class for {model_type!r}: only the checkpoint's own "
            "remote code (trust_remote_code) builds it, and export runs library code only; torch parity "
            "cannot be checked without it"
        )
    image_text = library_facts().image_text
    if model_type in image_text:
        text = image_text[model_type]
        return (
            f"{model_type!r} is an image-text model (its config has a vision_config); accelserve serves text "
            "decoders and reads their sizes from the top-level config"
            + (f". Export its text model as a {text!r} checkpoint instead" if text else "")
        )
    return None


def _npu_reason(model_type: str, hf_config: dict[str, Any] | None) -> str | None:
    from plugin.convert.qnn import DEFAULT_CONTEXT_LENGTH
    from plugin.convert.qnn.spec import qnn_unsupported_reason

    if hf_config is None:
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.for_model(model_type).to_dict()
        except (KeyError, ValueError) as e:
            return f"no transformers config class: {e}"
    return qnn_unsupported_reason(hf_config, DEFAULT_CONTEXT_LENGTH)


def support_for(model_type: str, hf_config: dict[str, Any] | None = None) -> ArchitectureSupport:
    """The table row for `model_type` (with `hf_config`, for that checkpoint: its class and NPU shape)."""
    hf_class = causal_lm_class(model_type)
    classes = (hf_config or {}).get("architectures") or [hf_class]
    refusal = config_refusal(model_type)
    if refusal:
        return ArchitectureSupport(model_type, hf_class, "-", "refused", reason=refusal)
    measured = measured_record().get(model_type, {})
    if measured.get("refusal"):
        return ArchitectureSupport(model_type, hf_class, "-", "refused", reason=measured["refusal"], measured=measured)
    fused = classes[0] in builder_classes() and not measured.get("fused_failure")
    reason = None
    if classes[0] in builder_classes() and not fused:
        reason = f"the builder's fused graph was measured wrong or failing: {measured['fused_failure']}"
    graph = "fused" if fused else "plain"
    moe = _moe_reason(model_type, hf_config)
    if moe and not fused:
        return ArchitectureSupport(model_type, hf_class, "-", "refused", reason=moe, measured=measured)
    fused_precisions = FUSED_PRECISIONS if fused else ()
    if measured.get("int4_failure"):  # the builder's int4 graph failed where its fp32 one is exact
        fused_precisions = tuple(p for p in fused_precisions if p != "int4")
        reason = f"int4: the builder's fused int4 graph failed ({measured['int4_failure']})"
    plain_precisions = () if moe else PLAIN_PRECISIONS  # MoE: only the fused graph routes correctly
    if moe and measured.get("int4_failure"):
        reason = f"{reason}; the plain graph is not an option either: {moe}"
    npu_reason = _npu_reason(model_type, hf_config)
    targets = ("cpu",) + (("gpu",) if plain_precisions else ()) + (() if npu_reason else ("npu",))
    precisions = tuple(dict.fromkeys((*fused_precisions, *plain_precisions)))
    status = "served" if measured.get("fp32_exact") else "unmeasured"
    return ArchitectureSupport(
        model_type, hf_class, graph, status, precisions, targets, reason, npu_reason, measured=measured
    )


MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _moe_reason(model_type: str, hf_config: dict[str, Any] | None) -> str | None:
    """Why a mixture-of-experts checkpoint cannot take the plain graph (None: not MoE).

    transformers routes tokens with data-dependent Python control flow (which experts were hit); the
    TorchScript trace Optimum exports records the experts its random dummy input happened to pick, so the
    graph is right only by luck: a tiny deepseek_v3 matched torch exactly in one export and on 1/4 greedy
    prompts (top-1 0.79, max logit difference 0.64) in the next. The builder's fused graph routes in the
    graph (gpt_oss), so MoE is served there.
    """
    config = hf_config
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.for_model(model_type).to_dict()
    flat = {**config, **(config.get("text_config") or {})}
    experts = next((int(flat[k]) for k in MOE_KEYS if isinstance(flat.get(k), int) and flat[k] > 0), 0)
    if not experts:
        return None
    return (
        f"mixture of experts ({experts} experts) without a fused builder graph: Optimum's traced graph keeps only "
        "the experts its dummy input routed to (measured: a tiny deepseek_v3 matched torch in one export and "
        "on 1/4 greedy prompts in the next)"
    )


def support_table() -> list[ArchitectureSupport]:
    """One row per model_type Optimum exports for text generation."""
    return [support_for(t) for t in optimum_model_types()]


def fused_graph_reason(hf_config: dict[str, Any]) -> str | None:
    """Why this checkpoint gets the plain graph rather than the builder's fused one (None: fused)."""
    model_type = str(hf_config.get("model_type", ""))
    classes = hf_config.get("architectures") or []
    if not classes:
        return "config.json names no architectures class; the builder dispatches on it"
    if classes[0] not in builder_classes():
        return (
            f"onnxruntime-genai {_version('onnxruntime-genai')}'s model builder has no builder for {classes[0]} "
            f"({model_type!r}, whose causal-LM class is {causal_lm_class(model_type)}); it is exported plain "
            "(the Optimum graph)"
        )
    failure = measured_record().get(model_type, {}).get("fused_failure")
    if failure:
        return f"the builder's fused graph for {model_type!r} was measured failing ({failure}); exporting plain"
    return None


def check_architecture(
    hf_config: dict[str, Any], source: Path | str = "", precision: str | None = None
) -> ArchitectureSupport:
    """Refuse, before any work, a checkpoint whose architecture (at `precision`) cannot be served; its row."""
    model_type = str(hf_config.get("model_type", ""))
    if not model_type:
        raise ExportError(f"{source}/config.json names no model_type; it is not a Hugging Face transformers checkpoint")
    row = support_for(model_type, hf_config)
    if row.status == "refused":
        raise ExportError(
            f"architecture {model_type!r} of {source} cannot be exported: {row.reason}. "
            "See `accelserve models --supported` for the architectures that can."
        )
    if precision is not None and precision not in row.precisions:
        raise ExportError(
            f"architecture {model_type!r} of {source} is served at {', '.join(row.precisions)}, not {precision}: "
            f"{row.reason}"
        )
    return row
