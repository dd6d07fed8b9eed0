"""Where training runs, chosen from the same device inventory as serving, with the reason.

Training needs a backward pass: torch on a GPU (bf16 where the GPU has bf16 units) or on the CPU (fp32).
NPU runtimes execute inference graphs only, so an NPU is never chosen, and the reason says so. A simulated
GPU executes on the CPU, so training on it is CPU training and is labelled that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from plugin.engine.devices import DeviceInfo, format_bytes
from plugin.finetune.errors import FinetuneError

DEVICE_CHOICES = ("auto", "gpu", "cpu")
NPU_NOTE = "NPUs run inference graphs only (no backward pass), so training never goes there"


@dataclass(frozen=True)
class TrainingPlacement:
    device_id: str  # "gpu:0" | "cpu:0": the hardware that executes the training
    torch_device: str  # "cuda:0" | "cpu"
    dtype: str  # "bfloat16" | "float32"
    name: str
    reason: str


def _skipped(devices: Sequence[DeviceInfo]) -> list[str]:
    notes = []
    for d in devices:
        if d.kind == "npu":
            label = " (emulated)" if d.emulated else " (simulated)" if d.simulated else ""
            label = "" if label.strip(" ()") in d.name.lower() else label
            notes.append(f"{d.id} {d.name}{label} not used: {NPU_NOTE}")
        elif d.kind == "gpu" and d.simulated:
            notes.append(f"{d.id} is simulated (runs on the CPU), so it would be CPU training labelled as a GPU")
    return notes


def place_training(devices: Sequence[DeviceInfo], device: str = "auto") -> TrainingPlacement:
    """A real GPU with torch when there is one (bf16 if it has bf16, else fp32), else the CPU in fp32."""
    if device not in DEVICE_CHOICES:
        hint = f"; {NPU_NOTE}" if device == "npu" else ""
        raise FinetuneError(f"training device must be one of {', '.join(DEVICE_CHOICES)} (got {device!r}){hint}")
    gpus = [d for d in devices if d.kind == "gpu" and not d.simulated and "torch" in d.backends]
    skipped = _skipped(devices)
    if device in ("auto", "gpu") and gpus:
        gpu = max(gpus, key=lambda d: d.memory_bytes)
        bf16 = bool(gpu.details.get("bf16"))
        dtype = "bfloat16" if bf16 else "float32"
        why = f"{gpu.id} {gpu.name} ({format_bytes(gpu.memory_bytes)}): torch on the largest real GPU, {dtype}"
        why += "" if bf16 else " (no bf16 units on this GPU)"
        return TrainingPlacement(gpu.id, f"cuda:{gpu.index}", dtype, gpu.name, "; ".join([why, *skipped]))
    if device == "gpu":
        raise FinetuneError(
            "training was pinned to a GPU but this machine has no real GPU torch can use"
            + (f" ({'; '.join(skipped)})" if skipped else "")
            + "; pass device='cpu' (--device cpu) or 'auto'"
        )
    cpu = next((d for d in devices if d.kind == "cpu"), None)
    name = cpu.name if cpu is not None else "CPU"
    first = "pinned to the CPU" if device == "cpu" else "no real GPU on this machine"
    why = f"cpu:0 {name}: {first}; torch in float32"
    return TrainingPlacement("cpu:0", "cpu", "float32", name, "; ".join([why, *skipped]))
