"""The NPU export: a static-shape, QDQ-quantized decoder pipeline compiled for Qualcomm's QNN HTP.

`export(model, target="npu")` comes here (graph "qnn"). The package is onnxruntime-genai's
`decoder-pipeline`: embeddings (CPU) -> context graph (static 1 x window, HTP) -> iterator graph
(1 x 1, HTP) -> lm_head (CPU), over static KV buffers shared by the two HTP graphs. Modules, in the
order a build uses them:

- spec.py: the checkpoint as numpy weights, and which checkpoints are refused (before any work);
- graphs.py: the four fp32 ONNX graphs;
- runner.py: a Python driver of the pipeline that windows prompts exactly as genai does;
- calibration.py: the built-in, versioned calibration prompts and the feeds they produce;
- quantize.py: static QDQ (uint16 activations; int8 per-channel or int4 block weights);
- compile.py: HTP compile into EP-context models, and QNN's per-node refusals;
- config.py: genai_config.json; parity.py: accuracy measured on HTP; build.py: the steps in order.

Runtime registration and provider options live in `backends.qnn_ep` (shared with the serving side).
"""

from __future__ import annotations

from typing import Any

DEFAULT_WINDOW = 64
DEFAULT_CONTEXT_LENGTH = 1024
QNN_PRECISIONS = ("int4", "int8")


def default_qnn_shape(hf_config: dict[str, Any], window: int | None, context_length: int | None) -> tuple[int, int]:
    """(window, context_length): the defaults, capped by the positions the model knows when not given."""
    if context_length is None:
        known = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or DEFAULT_CONTEXT_LENGTH
        context_length = min(DEFAULT_CONTEXT_LENGTH, int(known))
    if window is None:
        window = min(DEFAULT_WINDOW, context_length)
    return window, context_length


def check_qnn_request(hf_config: dict[str, Any], precision: str, window: int, context_length: int) -> None:
    """Refuse an HTP export before any work: precision, shapes, architecture, runtime present."""
    from backends import qnn_ep
    from plugin.convert.errors import ExportError
    from plugin.convert.qnn.spec import qnn_unsupported_reason

    if precision not in QNN_PRECISIONS:
        raise ExportError(
            f"target 'npu' builds the QNN HTP pipeline at int4 (w4a16) or int8 (w8a16), not {precision!r}"
        )
    if window < 1 or context_length < 2 or window > context_length:
        raise ExportError(f"need 1 <= window <= context_length (got window {window}, context_length {context_length})")
    reason = qnn_unsupported_reason(hf_config, context_length)
    if reason:
        raise ExportError(f"cannot export this checkpoint for the NPU (QNN HTP): {reason}")
    if not qnn_ep.is_installed():
        raise ExportError(
            f"target 'npu' compiles for Qualcomm's HTP with onnxruntime-qnn, which is not installed: "
            f"{qnn_ep.INSTALL_HINT}"
        )


def qnn_key_options(window: int, context_length: int) -> dict[str, Any]:
    """Cache-key options of an HTP export (shapes, calibration set, format)."""
    from importlib import metadata

    from plugin.convert.qnn.build import INT4_SENSITIVE, QNN_FORMAT
    from plugin.convert.qnn.calibration import calibration_record
    from plugin.convert.qnn.quantize import FLOAT_RANGE, RESIDUAL_IN_FLOAT

    cal = calibration_record()
    try:
        qnn_version = metadata.version("onnxruntime-qnn")
    except metadata.PackageNotFoundError:
        qnn_version = "missing"
    from backends import qnn_ep

    return {
        "onnxruntime-qnn": qnn_version,
        "htp_options": qnn_ep.htp_provider_options(),  # the compiled binaries depend on them
        "graph": "qnn",
        "qnn_format": QNN_FORMAT,
        "window": window,
        "context_length": context_length,
        "calibration": f"v{cal['version']}-{cal['sha256'][:16]}",
        "int4_sensitive": list(INT4_SENSITIVE),
        "float_range": FLOAT_RANGE,
        "residual_in_float": RESIDUAL_IN_FLOAT,
    }
