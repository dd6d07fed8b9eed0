"""Compile a QDQ transformer graph for HTP into an EP-context model, or say exactly which node HTP refuses.

The compile is an onnxruntime session on the QNN provider with `ep.context_enable=1` (write the
compiled graph), `ep.context_embed_mode=0` (the HTP binary in its own `.bin` beside the `_ctx.onnx`)
and `session.disable_cpu_ep_fallback=1`: a node QNN cannot take makes the session fail instead of
quietly running on the CPU. onnxruntime's error then only says that fallback was disabled; QNN's
per-node verdicts ("Validation FAILED ... REASON") go to onnxruntime's verbose log on stderr. On
failure the session is created once more with verbose logging and stderr captured at the file
descriptor level (the log is written by C++), and the verdicts are parsed into the ExportError.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plugin.convert.errors import ExportError

log = logging.getLogger(__name__)

_FAILED = re.compile(
    r"Validation FAILED for \d+ nodes in OrtNodeUnit \((?P<unit>[^)]*)\)\s*:(?P<body>.*?)(?=\n\S|\Z)", re.S
)
_NODE = re.compile(r"Operator type: (?P<op>\S+) Node name: (?P<name>.*?) Node index")
_REASON = re.compile(r"REASON\s*:\s*(?P<reason>.*)")
_UNSUPPORTED = re.compile(r"\{ name: (?P<name>[^,]+), type: (?P<op>[^ }]+) \}")


@dataclass(frozen=True)
class NodeRefusal:
    """One node HTP will not run, with QNN's reason."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op_type}): {self.reason}"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Path]:
    """Redirect file descriptor 2 (where onnxruntime's C++ logger writes) into a temp file."""
    with tempfile.NamedTemporaryFile(prefix="qnn-log-", suffix=".txt", delete=False) as f:
        path = Path(f.name)
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.dup2(fd, 2)
        yield path
    finally:
        os.dup2(saved, 2)
        os.close(fd)
        os.close(saved)


def parse_refusals(log_text: str) -> list[NodeRefusal]:
    """QNN's per-node verdicts from an onnxruntime verbose log (the op's own node, not its Q/DQ neighbours)."""
    refusals: dict[str, NodeRefusal] = {}
    for block in _FAILED.finditer(log_text):
        unit, body = block.group("unit"), block.group("body")
        reason_match = _REASON.search(body)
        reason = reason_match.group("reason").strip() if reason_match else "no reason given"
        nodes = [(m.group("op"), m.group("name").strip()) for m in _NODE.finditer(body)]
        main = [n for n in nodes if n[0] == unit] or nodes
        for op, name in main:
            refusals.setdefault(name, NodeRefusal(name, op, reason))
    if not refusals:  # older logs: only the summary line
        for m in _UNSUPPORTED.finditer(log_text):
            refusals.setdefault(m.group("name"), NodeRefusal(m.group("name"), m.group("op"), "unsupported by QNN EP"))
    return list(refusals.values())


def _session_options(config: dict[str, str], verbose: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 0 if verbose else 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return so


def htp_session(model: Path, provider_options: dict[str, str], config: dict[str, str] | None = None):
    """An onnxruntime session of `model` on HTP only (QNN registered by backends.qnn_ep)."""
    import onnxruntime as ort

    from backends import qnn_ep

    so = _session_options(config or {})
    so.add_provider_for_devices(qnn_ep.ep_devices(), provider_options)
    return ort.InferenceSession(str(model), so)


def diagnose(model: Path, provider_options: dict[str, str]) -> tuple[list[NodeRefusal], str]:
    """Create a session with verbose logging; return QNN's refusals and the error text (if it failed)."""
    import onnxruntime as ort

    from backends import qnn_ep

    so = _session_options({}, verbose=True)
    so.add_provider_for_devices(qnn_ep.ep_devices(), provider_options)
    error = ""
    with _captured_stderr() as path:
        try:
            ort.InferenceSession(str(model), so)
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
            error = str(e)
    text = path.read_text(errors="replace")
    path.unlink(missing_ok=True)
    return parse_refusals(text), error


def compile_context(model: Path, ctx_path: Path, provider_options: dict[str, str]) -> float:
    """Compile `model` for HTP into `ctx_path` (+ its .bin); return seconds. Raises ExportError naming nodes."""
    ctx_path.unlink(missing_ok=True)
    config = {
        "ep.context_enable": "1",
        "ep.context_embed_mode": "0",
        "ep.context_file_path": str(ctx_path),
    }
    start = time.perf_counter()
    try:
        htp_session(model, provider_options, config)
    except Exception as e:
        for leftover in [ctx_path, *ctx_path.parent.glob(f"{ctx_path.stem}*.bin")]:
            leftover.unlink(missing_ok=True)  # QNN may have written part of the context model
        refusals, _ = diagnose(model, provider_options)
        if refusals:
            shown = "; ".join(str(r) for r in refusals[:8])
            more = f" (and {len(refusals) - 8} more)" if len(refusals) > 8 else ""
            raise ExportError(
                f"{model.name} cannot run entirely on the QNN HTP (CPU fallback is disabled for the NPU graphs): "
                f"{shown}{more}"
            ) from e
        raise ExportError(f"QNN HTP compile of {model.name} failed: {e}") from e
    if not ctx_path.is_file():
        raise ExportError(f"QNN compiled {model.name} but wrote no EP-context model {ctx_path.name}")
    return time.perf_counter() - start


def context_files(ctx_path: Path) -> list[Path]:
    """The `_ctx.onnx` and the HTP binaries it references (embed mode 0)."""
    import onnx

    model = onnx.load(str(ctx_path), load_external_data=False)
    files = [ctx_path]
    for node in model.graph.node:
        if node.op_type == "EPContext":
            for a in node.attribute:
                if a.name == "ep_cache_context":
                    files.append(ctx_path.parent / a.s.decode())
    return files
