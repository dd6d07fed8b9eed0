"""The live memory the scheduler and the engine's residency read: each device's ledger (backends/memory.py).

A real GPU has its own ledger ("cuda:N", measured by CUDA); everything else this process runs keeps its
model in system RAM (the CPU, simulated devices, NPUs sharing host memory: QNN on Snapdragon, OpenVINO on
Intel), so those devices share the host ledger. What a device can take now is then what its ledger has
left (live free memory minus headroom minus every backend's reservation), plus what this engine's own
backends hold there (their model is already in; idle ones can be unloaded to make room).
"""

from __future__ import annotations

from collections.abc import Callable

from backends.memory import MemoryLedger, gpu_ledger, host_ledger
from plugin.engine.devices import DeviceInfo

LedgerLookup = Callable[[DeviceInfo], "MemoryLedger | None"]
"""device -> its ledger, or None when its memory cannot be measured (the scheduler then uses its static budget)."""


def live_ledger(device: DeviceInfo) -> MemoryLedger | None:
    """The process's ledger for `device`: its CUDA device's for a real GPU that torch sees, the host's for
    everything held in system RAM; None for a real GPU torch cannot see (an inventory made up elsewhere)."""
    if device.kind == "gpu" and not device.simulated:
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available() or device.index >= torch.cuda.device_count():
            return None
        return gpu_ledger(device.index)
    return host_ledger()


def no_ledger(device: DeviceInfo) -> MemoryLedger | None:
    """Static budgets only: for replaying placement over inventories that are not this machine's."""
    return None


def same_memory(a: DeviceInfo, b: DeviceInfo, ledgers: LedgerLookup) -> bool:
    """Whether two devices draw on the same memory (one device, or one ledger, e.g. host RAM)."""
    if a.id == b.id:
        return True
    la, lb = ledgers(a), ledgers(b)
    return la is not None and la is lb
