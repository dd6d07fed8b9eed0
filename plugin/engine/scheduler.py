"""Placement: which device, runtime and precision serve a request, and why. A pure function.

`place(profile, devices, request, policy, load, costs, exclude)` looks only at its arguments, so it can be
tested with made-up inventories and replayed over traces.

Feasibility (a device that fails any rule is never chosen; it is listed with the reason):
- the device is not in `exclude` (devices that already failed this request) and is healthy;
- the device has the runtime the placement needs (an NPU needs onnxruntime-genai for its provider);
- NPU: at most `NPU_MAX_PARAMS` parameters (4B: the NPU LLMs vendors ship are 3-4B, e.g. Phi-3-mini
  3.8B, Phi Silica 3.3B) and only a quantized onnxruntime-genai export (int4);
- memory: weights at the device's precision + an activation allowance (one prompt's prefill and the
  sampling tensors of the streams) + KV cache for (prompt + max_new_tokens) x concurrency must fit the
  device's budget: `MEMORY_FRACTION` of its memory (GPU 90%: the CUDA context and allocator fragmentation
  take the rest; CPU and NPU 75%: system RAM is shared with the OS and the server), and no more than its
  memory ledger has left now (`DeviceLoad.memory_available_bytes`: live free memory minus headroom minus
  what other backends reserved, plus what this engine's own backends hold there). A simulated device also
  has to fit the CPU's budget, since its weights live in host RAM.

Precision per device: NPU int4 (onnxruntime-genai); GPU bf16 when the GPU has it (compute capability
8.0+), else fp16; a simulated GPU runs torch on the CPU, in bf16 when the CPU has native bf16
instructions, else fp32; CPU (`cpu_backend="auto"`): the registered runtimes in their declared priority
(backends/registry.py); built in: onnxruntime-genai int4 up to 4B parameters, torch otherwise (bf16 with
native bf16 instructions, else fp32).

Prediction per feasible device (rates from `CostModel`): steps slow down by the device's batch
slowdown for every other sequence sharing it; when requests are queued, the wait is the queued work
(queued tokens / decode rate, an upper bound since prompt tokens are cheaper) plus half a request;
``ttft = wait + concurrency x prompt / prefill rate + one decode step``;
``total = ttft + max_new_tokens / per-stream rate``.

Policies:
- auto (default): small models (<= `AUTO_SMALL_MAX_PARAMS`) with light requests go to the NPU, else
  the GPU, else the CPU; heavy work (a larger model, a prompt >= `LONG_PROMPT_TOKENS`, >=
  `LONG_OUTPUT_TOKENS` new tokens or concurrency >= `HIGH_CONCURRENCY`) goes to the GPU, else to the
  fastest device. When the preferred device is loaded and another finishes sooner, the request spills.
- latency: least predicted total time.
- throughput: highest predicted generation rate for the request's streams (what batching buys).
- energy: least predicted energy (device watts from the cost model x busy time); ties prefer the
  NPU, then the CPU, then the GPU.
- gpu / npu / cpu: pinned. An absent, unhealthy, excluded or too-small pinned device raises
  PlacementError; a pinned request never moves silently.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from backends import registry
from backends.memory import MEMORY_FRACTION, activation_bytes, activation_element_bytes, device_budget, kv_cache_bytes
from backends.profile import ModelProfile
from backends.registry import BackendSpec
from plugin.engine.costmodel import CostModel, Rates
from plugin.engine.devices import SIMULATE_ENV, DeviceInfo, format_bytes

Policy = Literal["auto", "latency", "throughput", "energy", "gpu", "npu", "cpu"]
POLICIES: tuple[str, ...] = ("auto", "latency", "throughput", "energy", "gpu", "npu", "cpu")

NPU_MAX_PARAMS = 4_000_000_000
AUTO_SMALL_MAX_PARAMS = 2_000_000_000
LONG_PROMPT_TOKENS = 1024  # OpenVINO's NPU pipeline compiles a 1024-token prompt limit by default
LONG_OUTPUT_TOKENS = 512
HIGH_CONCURRENCY = 4

_KIND_ORDER = {"gpu": 0, "npu": 1, "cpu": 2}
_ENERGY_ORDER = {"npu": 0, "cpu": 1, "gpu": 2}


class PlacementError(RuntimeError):
    """No device can take the request (or the pinned one cannot); the message lists what exists."""


@dataclass(frozen=True)
class DeviceLoad:
    """Live load of one device id, as the engine sees it."""

    queued_requests: int = 0
    active_requests: int = 0
    queued_tokens: int = 0
    healthy: bool = True
    unhealthy_reason: str = ""
    # live, from the device's memory ledger: bytes this engine could use there now (None: not measured, the
    # static budget alone applies)
    memory_available_bytes: int | None = None


@dataclass(frozen=True)
class PlacementRequest:
    prompt_tokens: int
    max_new_tokens: int
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be an integer >= 0 (got {self.prompt_tokens!r})")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1 (got {self.concurrency!r})")


@dataclass(frozen=True)
class Alternative:
    device_id: str
    kind: str
    backend: str
    precision: str
    predicted_ttft_s: float
    predicted_tokens_per_s: float
    predicted_total_s: float
    feasible: bool
    why: str
    predicted_energy_j: float = 0.0


@dataclass(frozen=True)
class Placement:
    device: str  # kind: "gpu" | "npu" | "cpu"
    device_id: str  # "npu:0"
    backend: str  # "torch" | "onnxruntime-genai"
    provider: str  # expected to execute; the engine overwrites it with what really ran
    precision: str
    reason: str
    simulated: bool
    predicted_ttft_s: float
    predicted_tokens_per_s: float
    alternatives: tuple[Alternative, ...]  # every device, ranked: chosen first, infeasible last
    fallback_from: tuple[str, ...] = ()
    emulated: bool = False  # the device is a vendor's NPU runtime emulated on the CPU (QNN HTP on x86-64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Candidate:
    device: DeviceInfo
    backend: str
    precision: str
    provider: str
    feasible: bool
    why: str  # why infeasible, or the fit sentence when feasible
    weights: int = 0
    kv: int = 0
    activations: int = 0
    budget: int = 0
    budget_note: str = ""
    rates: Rates | None = None
    wait_s: float = 0.0
    ttft_s: float = 0.0
    tps: float = 0.0  # per stream
    total_s: float = 0.0
    idle_total_s: float = 0.0
    energy_j: float = 0.0
    watts: float = 0.0
    streams: int = 1

    @property
    def aggregate_tps(self) -> float:
        return self.tps * self.streams

    def alternative(self, why: str | None = None) -> Alternative:
        return Alternative(
            device_id=self.device.id,
            kind=self.device.kind,
            backend=self.backend,
            precision=self.precision,
            predicted_ttft_s=self.ttft_s,
            predicted_tokens_per_s=self.tps,
            predicted_total_s=self.total_s,
            feasible=self.feasible,
            why=why if why is not None else self.why,
            predicted_energy_j=self.energy_j,
        )


# ---- formatting helpers ---------------------------------------------------------------------------


def format_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.1f}{unit}" if v < 10 and unit == "B" else f"{v:.0f}{unit}"
    return str(n)


def _secs(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"


# ---- the decision ---------------------------------------------------------------------------------


def place(
    profile: ModelProfile,
    devices: Sequence[DeviceInfo],
    request: PlacementRequest,
    policy: str = "auto",
    load: Mapping[str, DeviceLoad] | None = None,
    costs: CostModel | None = None,
    exclude: Collection[str] = (),
    cpu_backend: str = "auto",
    backends: Mapping[str, BackendSpec] | None = None,
) -> Placement:
    """Choose device, backend and precision for `request` under `policy`; explain the choice."""
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; choose one of {', '.join(POLICIES)}")
    specs = registry.registered() if backends is None else backends
    if cpu_backend != "auto" and cpu_backend not in specs:
        raise ValueError(f"unknown cpu_backend {cpu_backend!r}; choose 'auto' or one of {', '.join(sorted(specs))}")
    if not devices:
        raise PlacementError(
            f"no devices given; discover them with plugin.engine.devices.discover_devices() ({_hint()})"
        )
    load = load or {}
    costs = costs if costs is not None else CostModel(path=None)
    cpu = next((d for d in devices if d.kind == "cpu" and not d.simulated), None)
    cands = [
        _evaluate(d, profile, request, load.get(d.id, DeviceLoad()), costs, exclude, cpu, cpu_backend, specs)
        for d in devices
    ]
    feasible = [c for c in cands if c.feasible]

    if policy in ("gpu", "npu", "cpu"):
        chosen, why = _pinned(policy, cands, devices)
        ranked = sorted(feasible, key=lambda c: c.total_s)
    elif not feasible:
        lines = "; ".join(f"{c.device.id}: {c.why}" for c in cands)
        raise PlacementError(
            f"no device can serve {profile.name} ({format_params(profile.num_parameters)} params) for "
            f"{request.prompt_tokens} prompt + {request.max_new_tokens} new tokens x {request.concurrency}: {lines}. "
            "Use a smaller or quantized model, fewer tokens, or wait for a device to recover."
        )
    elif policy == "latency":
        ranked = sorted(feasible, key=lambda c: (c.total_s, _KIND_ORDER[c.device.kind]))
        chosen, why = ranked[0], _latency_why(ranked, request)
    elif policy == "throughput":
        ranked = sorted(feasible, key=lambda c: (-c.aggregate_tps, c.total_s, _KIND_ORDER[c.device.kind]))
        chosen, why = ranked[0], _throughput_why(ranked, request)
    elif policy == "energy":
        ranked = sorted(feasible, key=lambda c: (c.energy_j, _ENERGY_ORDER[c.device.kind], c.total_s))
        chosen, why = ranked[0], _energy_why(ranked)
    else:
        chosen, why, ranked = _auto(feasible, cands, profile, request, load)

    reason = _reason(chosen, why, profile, request)
    others = [c for c in ranked if c is not chosen]
    infeasible = sorted(
        (c for c in cands if not c.feasible), key=lambda c: (_KIND_ORDER[c.device.kind], c.device.index)
    )
    alternatives = (
        chosen.alternative(f"chosen: {why}"),
        *(c.alternative(_compare(c, chosen)) for c in others),
        *(c.alternative() for c in infeasible),
    )
    return Placement(
        device=chosen.device.kind,
        device_id=chosen.device.id,
        backend=chosen.backend,
        provider=chosen.provider,
        precision=chosen.precision,
        reason=reason,
        simulated=chosen.device.simulated,
        emulated=chosen.device.emulated,
        predicted_ttft_s=chosen.ttft_s,
        predicted_tokens_per_s=chosen.tps,
        alternatives=alternatives,
    )


def _hint() -> str:
    return f"to try placement without accelerators, simulate them, e.g. {SIMULATE_ENV}=gpu:24GB,npu:8GB"


def serving_options(
    device: DeviceInfo,
    profile: ModelProfile,
    cpu_backend: str = "auto",
    specs: Mapping[str, BackendSpec] | None = None,
) -> list[tuple[str, str]]:
    """(backend, precision) pairs this device could serve the model with, preferred first.

    Asks every registered runtime that runs on this kind of device and can reach this device, in the
    runtimes' declared priority; the first that offers precisions for this model wins.
    """
    specs = registry.registered() if specs is None else specs
    details = {**device.details, "simulated": device.simulated}
    usable = sorted(
        (s for s in specs.values() if device.kind in s.devices and s.name in device.backends),
        key=lambda s: (s.rank(device.kind), s.name),
    )
    if device.kind == "cpu" and cpu_backend != "auto":
        usable = [s for s in usable if s.name == cpu_backend]
    for spec in usable:
        precisions = spec.precisions(device.kind, profile.num_parameters, details)
        if precisions:
            return [(spec.name, p) for p in precisions]
    return []


def _provider(device: DeviceInfo, backend: str) -> str:
    if device.simulated or device.kind == "cpu":
        return "CPUExecutionProvider"
    if device.kind == "gpu" and backend == "torch":
        return f"cuda:{device.index}"
    return device.providers[0] if device.providers else "CPUExecutionProvider"


def _budget(device: DeviceInfo, cpu: DeviceInfo | None) -> int:
    host = cpu.memory_bytes if cpu is not None else None
    return device_budget(device.kind, device.memory_bytes, simulated=device.simulated, host_memory_bytes=host)


def _evaluate(
    device: DeviceInfo,
    profile: ModelProfile,
    request: PlacementRequest,
    load: DeviceLoad,
    costs: CostModel,
    exclude: Collection[str],
    cpu: DeviceInfo | None,
    cpu_backend: str,
    specs: Mapping[str, BackendSpec],
) -> _Candidate:
    options = serving_options(device, profile, cpu_backend, specs)
    wanted = [s.name for s in specs.values() if device.kind in s.devices] or ["(none registered)"]
    backend, precision = options[0] if options else (wanted[0], "-")
    base = _Candidate(device, backend, precision, _provider(device, backend), False, "")

    def no(why: str) -> _Candidate:
        return replace(base, why=why)

    if device.id in exclude:
        return no("excluded: it already failed this request")
    if not load.healthy:
        return no(f"unhealthy: {load.unhealthy_reason or 'recent failure'}")
    if not options:
        have = ", ".join(device.backends) or "none"
        extra = f" ({device.details['note']})" if device.details.get("note") else ""
        reachable = [n for n in wanted if n in device.backends]
        if reachable:
            return no(f"no runtime here can serve a {format_params(profile.num_parameters)}-param model on it")
        return no(f"needs the {' or '.join(wanted)} runtime, this device has: {have}{extra}")
    if device.kind == "npu" and profile.num_parameters > NPU_MAX_PARAMS:
        return no(
            f"{format_params(profile.num_parameters)} params is over the NPU ceiling of "
            f"{format_params(NPU_MAX_PARAMS)}; NPUs serve small quantized models"
        )
    context = request.prompt_tokens + request.max_new_tokens
    budget = _budget(device, cpu)
    note = _budget_note(device, cpu, budget)
    live = load.memory_available_bytes
    if live is not None and live < budget:
        budget = max(live, 0)
        note = LIVE_NOTE
    for option in options:  # the first that fits; the last one's numbers if none does
        backend, precision = option
        weights = profile.weight_bytes(precision)
        kv = kv_cache_bytes([context] * request.concurrency, profile.kv_bytes_per_token(precision))
        activations = _activations(profile, precision, request)
        if weights + activations + kv <= budget:
            break
    base = replace(base, backend=backend, precision=precision)
    if weights + activations + kv > budget:
        return no(
            f"needs {format_bytes(weights + activations + kv)} ({format_bytes(weights)} weights at {precision} + "
            f"{format_bytes(activations)} activations + {format_bytes(kv)} KV cache) but its budget is "
            f"{format_bytes(budget)}" + note
        )

    rates = costs.rates(device, profile, precision)
    slowdown = costs.batch_slowdown(device)
    c = request.concurrency
    per_stream_idle = rates.decode_tps / (1 + slowdown * (c - 1))
    per_stream = rates.decode_tps / (1 + slowdown * (max(load.active_requests, 0) + c - 1))
    # the first token needs the prompt's compute plus one pass over the weights
    prefill_s = c * request.prompt_tokens / rates.prefill_tps + 1.0 / rates.decode_tps
    idle_total = prefill_s + request.max_new_tokens / per_stream_idle
    wait = 0.0
    if load.queued_requests > 0 or load.queued_tokens > 0:
        queued = load.queued_tokens / rates.decode_tps if load.queued_tokens > 0 else load.queued_requests * idle_total
        wait = queued + 0.5 * idle_total  # plus, on average, half of the request now running
    ttft = wait + prefill_s
    total = ttft + request.max_new_tokens / per_stream
    watts = costs.watts(device)
    return _Candidate(
        device,
        backend,
        precision,
        base.provider,
        True,
        "",
        weights=weights,
        kv=kv,
        activations=activations,
        budget=budget,
        budget_note=note,
        rates=rates,
        wait_s=wait,
        ttft_s=ttft,
        tps=per_stream,
        total_s=total,
        idle_total_s=idle_total,
        energy_j=watts * (total - wait),
        watts=watts,
        streams=c,
    )


LIVE_NOTE = " (what its memory ledger has left now: free memory minus headroom minus other backends' reservations)"


def _activations(profile: ModelProfile, precision: str, request: PlacementRequest) -> int:
    """The activation allowance of the one budget (backends/memory.py): one prompt's prefill and the sampling
    tensors of the request's streams."""
    return activation_bytes(
        hidden_size=profile.hidden_size,
        vocab_size=profile.vocab_size,
        element_bytes=activation_element_bytes(precision),
        prefill_tokens=request.prompt_tokens,
        max_batch=request.concurrency,
    )


def _budget_note(device: DeviceInfo, cpu: DeviceInfo | None, budget: int) -> str:
    own = int(device.memory_bytes * MEMORY_FRACTION[device.kind])
    pct = round(MEMORY_FRACTION[device.kind] * 100)
    if device.simulated and budget < own and cpu is not None:
        return f" (a simulated device holds its weights in host RAM: {pct}% of {format_bytes(cpu.memory_bytes)})"
    return f" ({pct}% of {format_bytes(device.memory_bytes)})"


def _pinned(kind: str, cands: list[_Candidate], devices: Sequence[DeviceInfo]) -> tuple[_Candidate, str]:
    of_kind = [c for c in cands if c.device.kind == kind]
    if not of_kind:
        have = ", ".join(f"{d.id} ({d.name})" for d in devices)
        raise PlacementError(
            f"policy {kind!r} pins the {kind.upper()}, but there is no {kind.upper()} here (devices: {have}). "
            f"Use policy 'auto' to let the scheduler choose, or {_hint()} (simulated devices run on the CPU)."
        )
    usable = sorted((c for c in of_kind if c.feasible), key=lambda c: (c.total_s, c.device.index))
    if not usable:
        lines = "; ".join(f"{c.device.id}: {c.why}" for c in of_kind)
        raise PlacementError(
            f"policy {kind!r} pins the {kind.upper()}, but it cannot take this request: {lines}. "
            "Use policy 'auto' to let the scheduler choose another device, or a smaller model or request."
        )
    return usable[0], f"pinned to the {kind.upper()} by policy {kind!r}"


def _heavy(profile: ModelProfile, request: PlacementRequest) -> list[str]:
    out = []
    if profile.num_parameters > AUTO_SMALL_MAX_PARAMS:
        out.append(f"{format_params(profile.num_parameters)} params > {format_params(AUTO_SMALL_MAX_PARAMS)}")
    if request.prompt_tokens >= LONG_PROMPT_TOKENS:
        out.append(f"prompt of {request.prompt_tokens} tokens >= {LONG_PROMPT_TOKENS}")
    if request.max_new_tokens >= LONG_OUTPUT_TOKENS:
        out.append(f"{request.max_new_tokens} new tokens >= {LONG_OUTPUT_TOKENS}")
    if request.concurrency >= HIGH_CONCURRENCY:
        out.append(f"concurrency {request.concurrency} >= {HIGH_CONCURRENCY}")
    return out


def _auto(
    feasible: list[_Candidate],
    cands: list[_Candidate],
    profile: ModelProfile,
    request: PlacementRequest,
    load: Mapping[str, DeviceLoad],
) -> tuple[_Candidate, str, list[_Candidate]]:
    heavy = _heavy(profile, request)
    order = ("gpu",) if heavy else ("npu", "gpu", "cpu")

    def preference(c: _Candidate) -> tuple[int, float, int]:
        kind = c.device.kind
        rank = order.index(kind) if kind in order else len(order)
        if c.device.emulated:  # correct but far slower than the CPU: auto never prefers it
            rank = len(order) + 1
        # among non-preferred kinds (heavy work without a GPU) the fastest wins
        return (rank, c.total_s, _KIND_ORDER[kind])

    ranked = sorted(feasible, key=preference)
    preferred = ranked[0]
    if heavy:
        first = next(iter(order))
        why = f"policy auto sends heavy work ({', '.join(heavy)}) to the GPU"
        if preferred.device.kind != first:
            why += f"; {_absent(first, cands)}, so it goes to the device predicted to finish first"
    else:
        why = (
            f"policy auto prefers the NPU for small models (<= {format_params(AUTO_SMALL_MAX_PARAMS)} params) "
            f"and light requests, then the GPU, then the CPU"
        )
        if preferred.device.kind != "npu":
            why += f"; {_absent('npu', cands)}"
            if preferred.device.kind == "cpu":
                why += f", {_absent('gpu', cands)}"

    fastest = min(feasible, key=lambda c: (c.total_s, _KIND_ORDER[c.device.kind]))
    delayed = preferred.total_s > preferred.idle_total_s + 1e-9
    if delayed and fastest is not preferred and fastest.total_s < preferred.total_s:
        pl = load.get(preferred.device.id, DeviceLoad())
        why += (
            f"; but {preferred.device.id} is busy ({pl.queued_requests} queued, {pl.active_requests} active: "
            f"predicted wait {_secs(preferred.wait_s)}, finish in {_secs(preferred.total_s)}), so the request "
            f"spills to {fastest.device.id}, which finishes in {_secs(fastest.total_s)}"
        )
        ranked = [fastest, *(c for c in ranked if c is not fastest)]
    return ranked[0], why, ranked


def _absent(kind: str, cands: list[_Candidate]) -> str:
    of_kind = [c for c in cands if c.device.kind == kind]
    if not of_kind:
        return f"there is no {kind.upper()}"
    if all(c.device.emulated for c in of_kind):
        ids = ", ".join(c.device.id for c in of_kind)
        return (
            f"the {kind.upper()} ({ids}) is emulated on this CPU, which proves the export runs on it but is far "
            f"slower than the CPU itself, so auto uses it only when pinned (policy {kind!r})"
        )
    return f"the {kind.upper()} cannot take it ({'; '.join(f'{c.device.id}: {c.why}' for c in of_kind)})"


def _next(ranked: list[_Candidate], fmt: Any) -> str:
    return f"; next best {ranked[1].device.id} at {fmt(ranked[1])}" if len(ranked) > 1 else ""


def _latency_why(ranked: list[_Candidate], request: PlacementRequest) -> str:
    c = ranked[0]
    return (
        f"policy latency picks the least predicted time to finish, {_secs(c.total_s)} (wait {_secs(c.wait_s)} + "
        f"prefill {_secs(c.ttft_s - c.wait_s)} + {request.max_new_tokens} tokens at {c.tps:.0f} tok/s)"
        + _next(ranked, lambda o: _secs(o.total_s))
    )


def _throughput_why(ranked: list[_Candidate], request: PlacementRequest) -> str:
    c = ranked[0]
    return (
        f"policy throughput picks the highest predicted generation rate, {c.aggregate_tps:.0f} tok/s over "
        f"{request.concurrency} stream(s)" + _next(ranked, lambda o: f"{o.aggregate_tps:.0f} tok/s")
    )


def _energy_why(ranked: list[_Candidate]) -> str:
    c = ranked[0]
    return (
        f"policy energy picks the least predicted energy, {c.energy_j:.0f} J ({c.watts:.0f} W assumed x "
        f"{_secs(c.total_s - c.wait_s)} busy)" + _next(ranked, lambda o: f"{o.energy_j:.0f} J ({o.watts:.0f} W)")
    )


def _compare(c: _Candidate, chosen: _Candidate) -> str:
    return (
        f"feasible: predicted {_secs(c.total_s)} total, {c.tps:.0f} tok/s, {c.energy_j:.0f} J "
        f"(chosen {chosen.device.id}: {_secs(chosen.total_s)}, {chosen.tps:.0f} tok/s, {chosen.energy_j:.0f} J)"
    )


def _reason(c: _Candidate, why: str, profile: ModelProfile, request: PlacementRequest) -> str:
    d = c.device
    streams = f" x {request.concurrency} streams" if request.concurrency > 1 else ""
    context = request.prompt_tokens + request.max_new_tokens
    fit = (
        f"{format_params(profile.num_parameters)}-param model ({format_bytes(c.weights)} at {c.precision} + "
        f"{format_bytes(c.kv)} KV cache for {context} tokens{streams}) fits {d.id}'s "
        f"{format_bytes(c.budget)} budget{c.budget_note}"
    )
    assert c.rates is not None
    predicted = (
        f"Predicted first token in {_secs(c.ttft_s)}, {c.tps:.0f} tok/s via {c.backend} (rates from {c.rates.source})."
    )
    sim = ""
    if d.simulated:
        sim = f" {d.id} is simulated: it runs on the CPU (CPUExecutionProvider), and its rates are the CPU's."
    elif d.emulated:
        sim = (
            f" {d.id} is emulated: the vendor's NPU compiler and runtime executing on the CPU, so the numbers are "
            "the NPU's and the speed is not."
        )
    return f"{fit}; {why}. {predicted}{sim}"
