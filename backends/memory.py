"""The one memory budget: how many bytes a device may hold, and whether weights plus a batch's KV cache fit.

The scheduler (will a model fit this device?), the engine (admit one more request to a loaded backend? make
room by unloading idle ones?) and the backends (refuse to load a model that cannot fit) all ask these
functions, so they can never disagree. `MemoryLedger` is the live side of the same budget: one per device
for the whole process (`gpu_ledger(N)` for CUDA device N, `host_ledger()` for system RAM, which the CPU,
simulated devices and NPUs sharing host memory all draw on), where each loaded backend reserves weights +
KV cache + an activation allowance against live free memory minus the same headroom, so that two backends
on one GPU never both count the same free bytes. The scheduler reads what each ledger has left, and the
engine's residency frees room by what the ledger says.

- A device may use `MEMORY_FRACTION` of its memory: GPU 90 % (the CUDA context, activations and allocator
  fragmentation take the rest); CPU and NPU 75 % (system RAM is shared with the OS and the server).
- A simulated device's weights really live in host RAM, so it also has to fit the CPU's share.
- A batch's KV cache is counted as the torch backend lays it out: every row left-padded to the longest row
  (rows x longest x bytes per token). For independent generators (onnxruntime-genai) that is an upper bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.profile import ModelProfile

MEMORY_FRACTION: dict[str, float] = {"gpu": 0.90, "npu": 0.75, "cpu": 0.75}


def device_budget(
    kind: str, memory_bytes: int, *, simulated: bool = False, host_memory_bytes: int | None = None
) -> int:
    """Bytes a device of `kind` with `memory_bytes` may hold for models (weights + KV cache)."""
    if kind not in MEMORY_FRACTION:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {sorted(MEMORY_FRACTION)}")
    budget = int(memory_bytes * MEMORY_FRACTION[kind])
    if simulated and host_memory_bytes is not None:
        budget = min(budget, int(host_memory_bytes * MEMORY_FRACTION["cpu"]))
    return budget


def kv_cache_bytes(kv_tokens: Sequence[int], bytes_per_token: int) -> int:
    """KV bytes of a batch whose rows reach these lengths (prompt + max_new_tokens each), padded to the longest."""
    return len(kv_tokens) * max(kv_tokens, default=0) * bytes_per_token


def fits(weight_bytes: int, kv_tokens: Sequence[int], bytes_per_token: int, budget: int) -> bool:
    """Whether weights plus the batch's KV cache fit `budget`."""
    return weight_bytes + kv_cache_bytes(kv_tokens, bytes_per_token) <= budget


# ---- the process-wide ledger: what every backend in this process has reserved on each device ----------------

ACTIVATION_ELEMENTS_PER_HIDDEN = 18
"""Prefill activations per prompt token, in units of hidden_size elements: residual and normed hidden
states, q/k/v and the attention output, and the MLP's gate/up/activation (about 3 x 4 x hidden). With
SDPA the attention matrix itself is never materialised."""
SAMPLING_COPIES = 8
"""[batch, vocab] fp32 tensors alive while a step chooses tokens (logits, penalised, sorted, probs, noise, ...)."""


def activation_bytes(
    *, hidden_size: int, vocab_size: int, element_bytes: int, prefill_tokens: int, max_batch: int
) -> int:
    """Working memory beside weights and KV cache: one prompt's prefill activations and the sampling tensors
    of a full batch. The KV cache's own transient (one layer's copy: DynamicCache concatenates a layer per
    step, and a join grows one layer at a time) scales with the cache: `kv_transient_fraction`."""
    prefill = prefill_tokens * ACTIVATION_ELEMENTS_PER_HIDDEN * hidden_size * element_bytes
    sampling = SAMPLING_COPIES * max_batch * vocab_size * 4
    return prefill + sampling


LOAD_KV_TOKENS = 4096
"""At load, weights plus the KV cache of one sequence of min(context length, this) tokens must fit; larger
batches are then admitted per request against the KV cache the backend was granted."""


def activation_element_bytes(precision: str) -> int:
    """Bytes of one activation element: fp16/bf16 models compute in 2 bytes, the rest (fp32, int4/int8 exports
    with fp32 activations on the CPU) in 4."""
    return 2 if precision in ("fp16", "bf16") else 4


def load_need(profile: ModelProfile, precision: str, *, max_batch: int) -> int:
    """The least a backend of `profile` at `precision` reserves at load: weights + activation allowance + the KV
    cache of one sequence of min(context, LOAD_KV_TOKENS) tokens, with its transient copy (what the engine
    must make room for before loading; the backend then takes as much KV cache as is left, up to a full
    batch at full context)."""
    one_seq = min(profile.context_length, LOAD_KV_TOKENS) * profile.kv_bytes_per_token(precision)
    activations = activation_bytes(
        hidden_size=profile.hidden_size,
        vocab_size=profile.vocab_size,
        element_bytes=activation_element_bytes(precision),
        prefill_tokens=min(profile.context_length, LOAD_KV_TOKENS),
        max_batch=max_batch,
    )
    transient = int(one_seq * kv_transient_fraction(profile.num_layers))
    return profile.weight_bytes(precision) + activations + one_seq + transient


def kv_transient_fraction(num_layers: int) -> float:
    """Extra memory per byte of KV cache while a step copies one layer of it."""
    return 1.0 / max(num_layers, 1)


Probe = Callable[[], tuple[int, int, int]]
"""() -> (free bytes on the device now, its total bytes, bytes this process already holds there)."""


@dataclass(frozen=True)
class Reservation:
    owner: str
    weights: int
    kv: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations


class LedgerError(RuntimeError):
    """A reservation does not fit what the device has left; the message says how much is missing and why."""


class MemoryLedger:
    """One device's memory for the whole process: every backend reserves weights + KV cache + an activation
    allowance here before loading, and releases it when unloaded.

    What may be reserved in total is measured live: free memory now, plus what this process already holds
    on the device (its own loaded weights and caches, which free memory no longer counts), minus the
    headroom the device kind keeps (1 - MEMORY_FRACTION of its total: the CUDA context, allocator
    fragmentation, other processes). Two backends sizing themselves from the same free memory therefore
    cannot both take it: the second sees what the first reserved.
    """

    def __init__(self, device: str, kind: str, probe: Probe) -> None:
        if kind not in MEMORY_FRACTION:
            raise ValueError(f"unknown device kind {kind!r}; expected one of {sorted(MEMORY_FRACTION)}")
        self.device = device
        self.kind = kind
        self._probe = probe
        self._lock = threading.Lock()
        self._reservations: dict[str, Reservation] = {}

    def headroom(self, total_bytes: int) -> int:
        return int(total_bytes * (1.0 - MEMORY_FRACTION[self.kind]))

    def capacity(self) -> int:
        """Bytes this process may have reserved on the device in total, right now."""
        free, total, held = self._probe()
        return max(free + held - self.headroom(total), 0)

    def reserved(self) -> int:
        with self._lock:
            return sum(r.total for r in self._reservations.values())

    def available(self) -> int:
        """Bytes a new reservation could get right now."""
        return max(self.capacity() - self.reserved(), 0)

    def reserve(
        self, owner: str, *, weights: int, activations: int, min_kv: int, max_kv: int, kv_transient: float = 0.0
    ) -> Reservation:
        """Reserve weights + activations + a KV cache of at least `min_kv` and at most `max_kv` bytes (as much
        as is left), plus `kv_transient` x the KV cache granted as further activations; raise LedgerError when
        even `min_kv` does not fit. One reservation per owner."""
        with self._lock:
            if owner in self._reservations:
                raise ValueError(f"{owner!r} already holds a reservation on {self.device}; release it first")
            free, total, held = self._probe()
            capacity = max(free + held - self.headroom(total), 0)
            left = capacity - sum(r.total for r in self._reservations.values())
            min_act = activations + int(min_kv * kv_transient)
            need = weights + min_act + min_kv
            if need > left:
                others = ", ".join(f"{r.owner} {_gib(r.total)}" for r in self._reservations.values()) or "none"
                raise LedgerError(
                    f"{owner} needs {_gib(need)} on {self.device} (weights {_gib(weights)} + activations "
                    f"{_gib(min_act)} + KV cache {_gib(min_kv)}) but only {_gib(max(left, 0))} is left: free "
                    f"{_gib(free)} + held by this process {_gib(held)} - headroom {_gib(self.headroom(total))} "
                    f"- reserved by other backends here ({others})"
                )
            kv = max(min_kv, min(max_kv, int((left - weights - activations) / (1.0 + kv_transient))))
            reservation = Reservation(owner, weights, kv, activations + int(kv * kv_transient))
            self._reservations[owner] = reservation
            return reservation

    def release(self, owner: str) -> None:
        with self._lock:
            self._reservations.pop(owner, None)

    def reservations(self) -> list[Reservation]:
        with self._lock:
            return list(self._reservations.values())


_ledgers: dict[str, MemoryLedger] = {}
_ledgers_lock = threading.Lock()


def ledger(device: str, kind: str, probe: Probe) -> MemoryLedger:
    """The process's one ledger for `device` (e.g. "cuda:0", "cpu"), created on first use with `probe`."""
    with _ledgers_lock:
        book = _ledgers.get(device)
        if book is None:
            book = _ledgers[device] = MemoryLedger(device, kind, probe)
        return book


def host_memory() -> tuple[int, int, int]:
    """(available system RAM, total RAM, this process's resident set): the host ledger's probe."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total), int(psutil.Process().memory_info().rss)


def cuda_memory(index: int) -> tuple[int, int, int]:
    """(free, total, held by this process's caching allocator) on CUDA device `index`: a GPU ledger's probe."""
    import torch

    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total), int(torch.cuda.memory_reserved(index))


def host_ledger() -> MemoryLedger:
    """The process's ledger of system RAM (the CPU, simulated devices, NPUs that share host memory)."""
    return ledger("cpu", "cpu", host_memory)


def gpu_ledger(index: int) -> MemoryLedger:
    """The process's ledger of CUDA device `index`."""
    return ledger(f"cuda:{index}", "gpu", lambda: cuda_memory(index))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
