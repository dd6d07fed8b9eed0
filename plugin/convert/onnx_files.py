"""Save ONNX graphs the way every export folder stores them: `model.onnx` plus one `model.onnx.data`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a process serving a cached export never loads onnx (~12 MB resident)
    import onnx

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` with all large weights in `<name>.data` next to it (one file, any size)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    import onnx

    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
        convert_attribute=False,
    )


def load_model(path: Path) -> onnx.ModelProto:
    import onnx

    return onnx.load(str(path), load_external_data=True)
