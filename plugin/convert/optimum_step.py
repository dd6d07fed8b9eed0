"""Step 1: Optimum's ONNX export (Python API, in process) of a local HF checkpoint to an fp32 decoder graph."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from plugin.convert.errors import ExportError
from plugin.convert.onnx_files import MODEL_FILE, load_model, save_model

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"


def optimum_export(source: Path, workdir: Path) -> Path:
    """Export `source` to `workdir/model.onnx` (+ `.data`), fp32 with a KV cache; return the model path.

    Optimum writes the graph plus the tokenizer/config files it copied; the graph is re-saved with our
    external-data layout so every precision's folder looks the same.
    """
    from optimum.exporters.onnx import main_export

    raw = workdir / "optimum"
    try:
        main_export(
            str(source),
            output=raw,
            task=TASK,
            device="cpu",
            do_validation=False,  # parity.py compares against torch on real prompts instead
            local_files_only=True,
            library_name="transformers",
        )
    except Exception as e:  # Optimum raises many types; the user needs one clear message
        raise ExportError(f"Optimum ONNX export of {source} failed: {type(e).__name__}: {e}") from e
    produced = raw / MODEL_FILE
    if not produced.is_file():
        files = sorted(f.name for f in raw.iterdir()) if raw.is_dir() else []
        raise ExportError(f"Optimum finished without writing {MODEL_FILE} in {raw}; it wrote {files}")
    fp32 = workdir / "fp32"
    fp32.mkdir(parents=True, exist_ok=True)
    save_model(load_model(produced), fp32 / MODEL_FILE)
    for f in raw.iterdir():  # tokenizer, configs, chat template
        if f.is_file() and not f.name.startswith(MODEL_FILE):
            shutil.copy2(f, fp32 / f.name)
    shutil.rmtree(raw)
    return fp32 / MODEL_FILE
