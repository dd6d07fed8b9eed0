"""The scheduler under a mixed workload: `auto` against every single-device policy, live and simulated.

    python benchmarks/bench_scheduler.py                # live replay on disjoint cores + trace simulations
    accelserve bench scheduler --quick                  # smoke run: a short trace, small generations
    python benchmarks/bench_scheduler.py --cluster-fleet  # only the simulated cluster fleet (section 4)

Workload: a seeded trace (`benchmarks/workload.py`) of short chats, long generations and bursts for two
models. The small model is the one given (default: SmolLM2-135M-Instruct). The large model is the SAME
weights presented to the scheduler under a Llama-2-7B-shaped profile (6.7B parameters, 32 layers): the
placement sees a 7B model (too big for an NPU, "heavy" for auto), while the live replay's execution speed
is the small model's. No 7B model can be downloaded or run here; the simulated fleet below uses the 7B
profile's own predicted rates.

Three sources, each labelled in the output:
1. live (disjoint cores): the real Engine and place() on the simulated inventory gpu:24GB,npu:8GB; the
   simulated GPU (torch, 1 thread) owns core 0 and the simulated NPU (onnxruntime-genai, 1 intra-op
   thread) owns core 1, pinned per thread with os.sched_setaffinity (on Linux it sets the calling
   thread's mask; the torch batch thread is pinned by its thread id). The host CPU device is left out: it
   has no core of its own left. Both engines (one per model) share the same loaded backends per device.
   Real accelerators, when present, get their own live run without pinning.
2. simulated (this machine): the same trace through place() in a discrete-event replay, with the
   per-device rates the live run measured; a check of the simulator against the live numbers.
3. simulated (hypothetical fleet): a GPU, an NPU and an 8-core CPU with the device-profile rates of
   plugin/costmodel.py (which cites its sources), on a longer trace, under every policy.
4. simulated (hypothetical cluster fleet, `--cluster-fleet`): what `accelserve serve --ray` places over,
   one device per replica: 1 GPU node + 4 NPU nodes, 2 + 8, and 4 + 16, with the same device profiles and
   an arrival rate that grows with the fleet (the same load per node), under every policy; plus the
   measured wall time of one place() call over that many devices on this CPU (the ingress pays it per
   request). Written to benchmarks/results/scheduler_cluster_fleet.json.
Energy: measured from RAPL (/sys/class/powercap) or NVML when readable, else estimated from device-profile
watts x busy time; the label says which.
Writes benchmarks/results/scheduler.json and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS_DIR,
    EnergyMeter,
    Stats,
    busy_note,
    machine_info,
    plot_bars,
    write_json,
)
from benchmarks.workload import (
    LONG_PROMPTS,
    SLO,
    Outcome,
    TraceRequest,
    TraceShape,
    make_trace,
    metrics,
    simulate,
)
from plugin.engine.scheduler import POLICIES

log = logging.getLogger("bench_scheduler")

SIMULATION = "gpu:24GB,npu:8GB"
LARGE_SHAPE = {  # Llama-2-7B's published config
    "num_parameters": 6_738_415_616,
    "num_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 128,
    "vocab_size": 32000,
    "context_length": 4096,
}
FLEET_SHAPE = TraceShape(duration_s=600, chat_rate=1.5, long_rate=0.1, bursts=10, burst_size=16)
QUICK_SHAPE = TraceShape(
    duration_s=6, chat_rate=1.0, long_rate=0.2, bursts=1, burst_size=3, chat_tokens=(4, 8), long_tokens=16
)
WARM_UP_TOKENS = 32
ALL_POLICIES = POLICIES


def large_profile(small: Any) -> Any:
    """The small model's profile re-dimensioned as Llama-2-7B (what the scheduler sees for 'large')."""
    return dataclasses.replace(small, name=f"{small.name} as 7B", architecture="llama", **LARGE_SHAPE)


def count_prompt_tokens(model_path: Path, trace: Sequence[TraceRequest]) -> list[TraceRequest]:
    """Fill prompt_tokens with the chat-templated length, as the engine counts it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    cache: dict[str, int] = {}
    for r in trace:
        if r.prompt not in cache:
            ids = tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True)
            cache[r.prompt] = len(ids if isinstance(ids, list) else ids["input_ids"])
    return [dataclasses.replace(r, prompt_tokens=cache[r.prompt]) for r in trace]


# ---- disjoint cores ------------------------------------------------------------------------------------------


class PinnedBackend:
    """A backend whose work runs only on `cores`: every generating thread is pinned as it starts."""

    def __init__(self, inner: Any, cores: set[int]) -> None:
        self.inner = inner
        self.cores = set(cores)
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:  # both engines may load the shared backend at once
            self.inner.load()
            runner = getattr(self.inner, "_runner", None)  # torch: the batch thread does the compute
            thread = getattr(runner, "_thread", None)
            if thread is not None and thread.native_id is not None:
                os.sched_setaffinity(thread.native_id, self.cores)

    def generate(self, request: Any) -> Iterator[Any]:
        chunks = self.inner.generate(request)  # validation errors raise here, as the engine expects
        return self._pinned(chunks)

    def _pinned(self, chunks: Iterator[Any]) -> Iterator[Any]:
        os.sched_setaffinity(0, self.cores)  # Linux: 0 is the calling thread, not the whole process
        yield from chunks

    def cancel(self, request_id: str) -> bool:
        return self.inner.cancel(request_id)

    def capabilities(self) -> Any:
        return self.inner.capabilities()

    def health(self) -> Any:
        return self.inner.health()

    def unload(self) -> None:
        with self._lock:
            self.inner.unload()

    def affinity(self) -> dict[str, Any]:
        """What the pinning really is, for the report."""
        runner = getattr(self.inner, "_runner", None)
        thread = getattr(runner, "_thread", None)
        out: dict[str, Any] = {"cores": sorted(self.cores), "backend": self.inner.capabilities().name}
        if thread is not None and thread.native_id is not None and thread.is_alive():
            out["torch_batch_thread_affinity"] = sorted(os.sched_getaffinity(thread.native_id))
        # torch: set_num_threads is per OpenMP thread; the batch thread is started by the loading thread right
        # after it set 1, and inherits it (checked: torch.get_num_threads() in such a thread returns 1).
        out["intra_op_threads"] = getattr(self.inner, "num_threads", None)
        return out


class PinnedFactory:
    """Builds one single-threaded backend per (device, runtime, precision), pinned to that device's cores.

    Shared by both engines, so the small and large model's requests on a device run on one backend.
    """

    def __init__(self, cores: dict[str, set[int]]) -> None:
        self.cores = cores
        self.backends: dict[tuple[str, str, str], PinnedBackend] = {}
        self._lock = threading.Lock()

    def __call__(self, model: Any, placement: Any, device: Any) -> PinnedBackend:
        key = (device.id, placement.backend, placement.precision)
        with self._lock:
            if key not in self.backends:
                self.backends[key] = PinnedBackend(self._build(model, placement, device), self.cores[device.id])
            return self.backends[key]

    @staticmethod
    def _build(model: Any, placement: Any, device: Any) -> Any:
        """The serving loader's model preparation (plugin/engine/loaders.py), with one intra-op thread each."""
        from backends import registry
        from backends.ort_genai.backend import OrtGenaiBackend
        from backends.torch.backend import TorchBackend
        from plugin.engine.loaders import prepare

        folder = prepare(model, registry.get(placement.backend).format, device, placement.precision)
        if placement.backend == "onnxruntime-genai":
            return OrtGenaiBackend(folder, device=device.kind, simulated=device.simulated, num_threads=1)
        return TorchBackend(
            folder,
            device="cpu",
            dtype=placement.precision,
            simulated_device=device.kind if device.simulated else None,
            num_threads=1,
        )


def core_plan(devices: Sequence[Any]) -> tuple[dict[str, set[int]], str | None]:
    """One core per simulated device, in order; a note when there are fewer cores than devices."""
    available = sorted(os.sched_getaffinity(0))
    plan = {d.id: {available[i % len(available)]} for i, d in enumerate(devices)}
    note = None
    if len(available) < len(devices):
        note = f"only {len(available)} core(s) for {len(devices)} devices: some share a core, capacity is not disjoint"
    return plan, note


# ---- live replay ---------------------------------------------------------------------------------------------


def replay(engines: dict[str, Any], trace: Sequence[TraceRequest], policy: str) -> list[Outcome]:
    """Submit each request at its arrival time from its own thread; record what the client saw."""
    outcomes = [Outcome(r) for r in trace]
    t0 = time.perf_counter() + 0.2

    def client(o: Outcome) -> None:
        r = o.request
        time.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
        try:
            stream = engines[r.model].chat(
                [{"role": "user", "content": r.prompt}], stream=True, policy=policy, max_new_tokens=r.max_new_tokens
            )
            for chunk in stream:
                now = time.perf_counter() - t0
                if o.first_token_s is None:
                    o.first_token_s = now
                o.device_id = chunk.placement.device_id
                if chunk.finish_reason is not None:
                    o.finish_s = now
                    if chunk.metrics is not None:
                        o.new_tokens = chunk.metrics.new_tokens
                        o.service_start_s = now - chunk.metrics.total_s
                    if chunk.finish_reason == "error":
                        o.error = f"backend error: {chunk.error}"
        except Exception as e:  # the outcome records it: a failed request counts against goodput
            o.error = f"{type(e).__name__}: {e}"
            o.finish_s = None

    threads = [threading.Thread(target=client, args=(o,), name=f"trace-{o.request.index}") for o in outcomes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def warm_up(engines: dict[str, Any], devices: Sequence[Any], repeats: int = 1, tokens: int = WARM_UP_TOKENS) -> None:
    """Load every backend the replay can use; the idle requests give the cost model measured rates per pair."""
    from plugin.engine.engine import NoDeviceAvailable

    for name, engine in engines.items():
        for d in devices:
            try:
                for _ in range(repeats):
                    engine.chat([{"role": "user", "content": LONG_PROMPTS[0]}], policy=d.kind, max_new_tokens=tokens)
            except NoDeviceAvailable as e:  # e.g. the 7B profile on the NPU: the replay will not place it there
                log.info("%s cannot run on %s: %s", name, d.id, e)


def live(
    small: Any,
    trace: Sequence[TraceRequest],
    policies: Sequence[str],
    slo: SLO,
    simulate_spec: str | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Replay the trace through real engines, per policy. Simulated devices get disjoint cores."""
    from plugin.engine.costmodel import CostModel, cpu_profile
    from plugin.engine.devices import discover_devices
    from plugin.engine.engine import Engine
    from plugin.models.resolve import ResolvedModel

    large = ResolvedModel(small.ref, small.path, large_profile(small.profile), small.source)
    if simulate_spec:
        devices = simulated_only(simulate_spec)
        cores, core_note = core_plan(devices)
        factory: Any = PinnedFactory(cores)
        source = "live (disjoint cores)"
        watts = {d.id: cpu_profile(len(cores[d.id])).watts for d in devices}
        watts_note = f"{cpu_profile(1).watts:g} W per busy core (CPU device profile; simulated devices run on cores)"
    else:
        devices = discover_devices(simulate="")
        cores, core_note, factory = {}, None, None
        source = "live (real devices)"
        costs0 = CostModel(path=None)
        watts = {d.id: costs0.watts(d) for d in devices}
        watts_note = "device-profile watts"
    costs = CostModel(path=None)
    engines = {
        name: Engine(m, devices=devices, backend_factory=factory, cost_model=costs, max_queue=256)
        for name, m in (("small", small), ("large", large))
    }
    runs: dict[str, Any] = {}
    try:
        progress(f"{source}: loading and warming up backends")
        warm_up(engines, devices)  # loads; the first requests on a fresh backend are slow, so not measured
        calibration = CostModel(path=None)
        for e in engines.values():
            e.costs = calibration
        warm_up(engines, devices, repeats=2)
        profiles = {"small": small.profile, "large": large.profile}
        rates = costs_table(calibration, devices, profiles)  # idle single-stream rates
        pinning = {}
        if isinstance(factory, PinnedFactory):
            pinning = {f"{k[0]} {k[1]} {k[2]}": b.affinity() for k, b in factory.backends.items()}
        for policy in policies:
            if policy not in ("auto", *(d.kind for d in devices)):
                continue
            progress(f"{source}: replaying {len(trace)} requests under policy {policy}")
            fresh = CostModel(path=None)  # every policy starts from the same kind of calibration
            for e in engines.values():
                e.costs = fresh
            warm_up(engines, devices)
            meter = EnergyMeter()
            meter.start()
            outcomes = replay(engines, trace, policy)
            measured = meter.stop()
            joules = sum(r.joules for r in measured.values()) if measured else None
            label = (
                "measured: " + ", ".join(sorted(measured)) + " (whole package, includes other processes)"
                if measured
                else f"estimated: {watts_note} x busy time"
            )
            runs[policy] = {
                "metrics": metrics(outcomes, slo, watts, joules, label),
                "outcomes": [_outcome_row(o) for o in outcomes],
            }
    finally:
        for e in engines.values():
            e.close()
    return {
        "source": source,
        "devices": [d.to_dict() for d in devices],
        "cores": {k: sorted(v) for k, v in cores.items()},
        "core_note": core_note,
        "pinning": pinning,
        "runs": runs,
        "measured_rates": rates,
    }


def simulated_only(spec: str) -> list[Any]:
    """The simulated devices of `spec`, numbered from 0 per kind (real NPUs, e.g. an emulated HTP, left out)."""
    from plugin.engine.devices import discover_devices

    out, seen = [], dict.fromkeys(("gpu", "npu", "cpu"), 0)
    for d in discover_devices(simulate=spec):
        if d.simulated:
            out.append(dataclasses.replace(d, index=seen[d.kind]))
            seen[d.kind] += 1
    return out


def costs_table(costs: Any, devices: Sequence[Any], profiles: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-device rates the cost model holds (measured where it served), per model."""
    from plugin.engine.scheduler import serving_options

    out = []
    for name, profile in profiles.items():
        for d in devices:
            precision = serving_options(d, profile)[0][1]
            r = costs.rates(d, profile, precision)
            out.append(
                {
                    "model": name,
                    "device_id": d.id,
                    "precision": precision,
                    "prefill_tps": r.prefill_tps,
                    "decode_tps": r.decode_tps,
                    "source": r.source,
                }
            )
    return out


def _outcome_row(o: Outcome) -> dict[str, Any]:
    r = o.request
    return {
        "index": r.index,
        "arrival_s": r.arrival_s,
        "kind": r.kind,
        "model": r.model,
        "max_new_tokens": r.max_new_tokens,
        "prompt_tokens": r.prompt_tokens,
        "device_id": o.device_id,
        "ttft_s": o.ttft_s,
        "latency_s": o.latency_s,
        "new_tokens": o.new_tokens,
        "error": o.error,
    }


# ---- simulations ---------------------------------------------------------------------------------------------


class _FixedCosts:
    """A CostModel view with rates pinned from a table (the live run's measurements)."""

    def __init__(self, base: Any, table: list[dict[str, Any]], profiles: dict[str, Any]) -> None:
        from plugin.engine.costmodel import Rates

        self.base = base
        self._rates = {
            (row["device_id"], profiles[row["model"]].name): Rates(row["prefill_tps"], row["decode_tps"], 1, 1)
            for row in table
        }

    def rates(self, device: Any, model: Any, precision: str) -> Any:
        return self._rates.get((device.id, model.name)) or self.base.rates(device, model, precision)

    def watts(self, device: Any) -> float:
        return self.base.watts(device)

    def batch_slowdown(self, device: Any) -> float:
        return self.base.batch_slowdown(device)


def fleet_devices() -> list[Any]:
    """A hypothetical workstation: one GPU, one NPU, an 8-core CPU (profiles, not hardware)."""
    from plugin.engine.devices import DeviceInfo

    return [
        DeviceInfo("gpu", "GPU (device profile: 600 GB/s, 40 TFLOP/s, 250 W)", 24 * 10**9, ("torch",),
                   ("CUDAExecutionProvider",), details={"bf16": True}),
        DeviceInfo("npu", "NPU (device profile: 40 GB/s, 4 TFLOP/s, 2 W)", 16 * 10**9, ("onnxruntime-genai",),
                   ("QNNExecutionProvider",), details={"genai_providers": ["QNNExecutionProvider"]}),
        DeviceInfo("cpu", "CPU (device profile: 8 cores)", 32 * 10**9, ("torch", "onnxruntime-genai"),
                   ("CPUExecutionProvider",), details={"physical_cores": 8}),
    ]  # fmt: skip


def run_simulation(
    trace: Sequence[TraceRequest],
    profiles: dict[str, Any],
    devices: Sequence[Any],
    policies: Sequence[str],
    costs: Any,
    capacity: dict[str, int],
    slo: SLO,
    source: str,
    watts: dict[str, float] | None = None,
) -> dict[str, Any]:
    watts = watts or {d.id: costs.watts(d) for d in devices}
    runs = {}
    kinds = {d.kind for d in devices}
    for policy in policies:
        if policy in ("gpu", "npu", "cpu") and policy not in kinds:
            continue
        outcomes = simulate(trace, profiles, devices, policy, costs, capacity)
        label = "estimated (simulated): device-profile watts x simulated busy time"
        runs[policy] = {"metrics": metrics(outcomes, slo, watts, None, label)}
    return {"source": source, "devices": [d.to_dict() for d in devices], "capacity": capacity, "runs": runs}


# ---- a simulated cluster fleet (what `accelserve serve --ray` places over) -----------------------------------

CLUSTER_UNIT = TraceShape(  # the load one unit (1 GPU node + 4 NPU nodes) is offered; a fleet of k units gets k x
    duration_s=300, chat_rate=2.0, long_rate=0.1, bursts=4, burst_size=16
)
CLUSTER_FLEETS = ((1, 4), (2, 8), (4, 16))  # (GPU nodes, NPU nodes)
CLUSTER_POLICIES = ("auto", "latency", "throughput", "energy", "gpu", "npu")


def cluster_fleet_devices(gpus: int, npus: int) -> list[Any]:
    """`gpus` GPU nodes and `npus` NPU nodes, one device each, with fleet_devices()' profiles (not hardware)."""
    base = {d.kind: d for d in fleet_devices()}
    return [dataclasses.replace(base["gpu"], index=i) for i in range(gpus)] + [
        dataclasses.replace(base["npu"], index=i) for i in range(npus)
    ]


class _TimedPlace:
    """place(), timing every call: the ingress's decision cost over a fleet, measured on this CPU."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from plugin.engine.scheduler import place

        t0 = time.perf_counter()
        try:
            return place(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - t0)


def cluster_fleet(args: argparse.Namespace, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Section 4: the same placement over fleets of 5, 10 and 20 nodes at the same load per node (simulated)."""
    from benchmarks.common import percentile
    from plugin.engine.costmodel import CostModel
    from plugin.models.resolve import resolve_model

    small = resolve_model(args.model)
    profiles = {"small": small.profile, "large": large_profile(small.profile)}
    slo = SLO(args.slo_ttft, args.slo_tpot)
    costs = CostModel(path=None)
    fleets = {}
    for gpus, npus in CLUSTER_FLEETS:
        k = gpus
        shape = dataclasses.replace(
            CLUSTER_UNIT,
            duration_s=60 if args.quick else CLUSTER_UNIT.duration_s,
            chat_rate=CLUSTER_UNIT.chat_rate * k,
            long_rate=CLUSTER_UNIT.long_rate * k,
            bursts=CLUSTER_UNIT.bursts * k,
        )
        trace = count_prompt_tokens(small.path, make_trace(shape, args.seed))
        devices = cluster_fleet_devices(gpus, npus)
        runs = {}
        for policy in CLUSTER_POLICIES:
            progress(f"cluster fleet {gpus} GPU + {npus} NPU nodes, {policy}")
            timed = _TimedPlace()
            outcomes = simulate(trace, profiles, devices, policy, costs, {"gpu": 8, "npu": 4}, place_fn=timed)
            m = metrics(outcomes, slo, {d.id: costs.watts(d) for d in devices}, None,
                        "estimated (simulated): device-profile watts x simulated busy time")  # fmt: skip
            m["place_call_ms"] = {
                "p50": percentile(timed.seconds, 50) * 1e3,
                "p95": percentile(timed.seconds, 95) * 1e3,
                "source": "measured on this CPU (real place() over the simulated fleet)",
            }
            runs[policy] = {"metrics": m}
        fleets[f"{gpus}gpu_{npus}npu"] = {
            "source": f"simulated (hypothetical cluster fleet): {gpus} GPU nodes + {npus} NPU nodes, device profiles",
            "gpus": gpus,
            "npus": npus,
            "trace": {"shape": shape.describe(), "requests": len(trace)},
            "capacity": {"gpu": 8, "npu": 4},
            "devices": [d.to_dict() for d in devices[:1] + devices[gpus : gpus + 1]],  # one of each kind
            "runs": runs,
        }
    return {
        "benchmark": "scheduler_cluster_fleet",
        "label": "simulated: device profiles of plugin/engine/costmodel.py, not hardware; place() timings measured",
        "model": {"small": profiles["small"].to_dict(), "large": profiles["large"].to_dict()},
        "settings": {"seed": args.seed, "quick": args.quick, "slo": slo.describe()},
        "machine": machine_info(),
        "fleets": fleets,
    }


def print_cluster_fleet(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{result['label']} - SLO: {result['settings']['slo']}")
    for col in ("fleet", "policy", "requests", "failed", "p50 s", "p95 s", "TTFT p95", "goodput", "tok/s", "J/token",
                "GPU/NPU share", "place() ms p50/p95"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("fleet", "policy") else "right")
    for name, fleet in result["fleets"].items():
        for policy, run in fleet["runs"].items():
            m = run["metrics"]
            on_gpu = sum(v["requests"] for d, v in m["per_device"].items() if d.startswith("gpu"))
            on_npu = sum(v["requests"] for d, v in m["per_device"].items() if d.startswith("npu"))
            table.add_row(
                name,
                policy,
                str(m["requests"]),
                str(m["failed"]),
                _f(m["latency_p50_s"]),
                _f(m["latency_p95_s"]),
                _f(m["ttft_p95_s"]),
                f"{m['goodput_fraction']:.0%}",
                _f(m["throughput_tps"], 0),
                _f(m["energy"]["per_token_j"], 3),
                f"{on_gpu}/{on_npu}",
                f"{m['place_call_ms']['p50']:.2f}/{m['place_call_ms']['p95']:.2f}",
            )
    console.print(table)


# ---- orchestration and reporting -----------------------------------------------------------------------------


def benchmark(args: argparse.Namespace, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from plugin.engine.costmodel import CostModel, cpu_profile
    from plugin.engine.devices import discover_devices
    from plugin.models.resolve import resolve_model

    machine = machine_info()
    small = resolve_model(args.model)
    profiles = {"small": small.profile, "large": large_profile(small.profile)}
    slo = SLO(args.slo_ttft, args.slo_tpot)
    shape = QUICK_SHAPE if args.quick else TraceShape(duration_s=args.duration)
    trace = count_prompt_tokens(small.path, make_trace(shape, args.seed))
    result: dict[str, Any] = {
        "benchmark": "scheduler",
        "model": {"small": profiles["small"].to_dict(), "large": profiles["large"].to_dict()},
        "model_note": (
            "large = the small model's weights presented to the scheduler as a Llama-2-7B-shaped profile; live "
            "replays run the small model's weights for it, the simulations use the 7B profile's rates"
        ),
        "settings": {"seed": args.seed, "quick": args.quick, "policies": list(args.policies), "slo": slo.describe()},
        "trace": {"shape": shape.describe(), "requests": len(trace), "kinds": _count(r.kind for r in trace)},
        "machine": machine,
        "sections": {},
    }
    live_rates = None
    if not args.no_live:
        section = live(small, trace, args.policies, slo, SIMULATION, progress)
        result["sections"]["live_disjoint_cores"] = section
        live_rates = section["measured_rates"]
        real = [d for d in discover_devices(simulate="") if d.kind != "cpu"]
        if real:
            result["sections"]["live_real_devices"] = live(small, trace, args.policies, slo, None, progress)
        else:
            result["real_devices_note"] = "no real GPU or NPU on this machine: no live run on real accelerators"
    if not args.no_sim:
        progress("simulating")
        sim_devices = simulated_only(SIMULATION)
        base = CostModel(path=None)
        costs = _FixedCosts(base, live_rates, profiles) if live_rates else base
        result["sections"]["simulated_this_machine"] = run_simulation(
            trace,
            profiles,
            sim_devices,
            args.policies,
            costs,
            {"gpu": 8, "npu": 4},
            slo,
            "simulated (this machine): rates "
            + (
                "measured by the live warm-up (idle, one stream)"
                if live_rates
                else "from device profiles (no live run)"
            ),
            {d.id: cpu_profile(1).watts for d in sim_devices},  # one core each, as in the live replay
        )
        fleet_trace = count_prompt_tokens(small.path, make_trace(FLEET_SHAPE if not args.quick else shape, args.seed))
        fleet = run_simulation(
            fleet_trace,
            profiles,
            fleet_devices(),
            ALL_POLICIES,
            base,
            {"gpu": 8, "npu": 4, "cpu": 4},
            slo,
            "simulated (hypothetical fleet): rates from the device profiles in plugin/costmodel.py",
        )
        fleet["trace"] = {"shape": (FLEET_SHAPE if not args.quick else shape).describe(), "requests": len(fleet_trace)}
        result["sections"]["simulated_fleet"] = fleet
    result["load_average_at_end"] = list(os.getloadavg())
    result["busy_warning"] = busy_note()
    return result


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def print_tables(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for key, section in result["sections"].items():
        table = Table(title=f"{section['source']} - SLO: {result['settings']['slo']}")
        cols = ("policy", "served/failed", "placed on", "p50 s", "p95 s", "TTFT p50", "TTFT p95", "goodput")
        for col in (*cols, "tok/s", "J/token", "energy"):
            table.add_column(col, justify="left" if col in ("policy", "placed on", "energy") else "right")
        for policy, run in section["runs"].items():
            m = run["metrics"]
            placed = ", ".join(f"{d} {v['requests']}" for d, v in sorted(m["per_device"].items()))
            table.add_row(
                policy,
                f"{m['completed']}/{m['failed']}",
                placed,
                _f(m["latency_p50_s"]),
                _f(m["latency_p95_s"]),
                _f(m["ttft_p50_s"]),
                _f(m["ttft_p95_s"]),
                f"{m['slo_met']} ({m['goodput_fraction']:.0%})",
                _f(m["throughput_tps"], 1),
                _f(m["energy"]["per_token_j"], 3),
                m["energy"]["source"].split(":")[0],
            )
        console.print(table)
        if key == "live_disjoint_cores":
            console.print(
                f"cores per device: {section['cores']}" + (f"; {section['core_note']}" if section["core_note"] else "")
            )


def make_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = []
    for key, section in result["sections"].items():
        policies = list(section["runs"])
        if not policies:
            continue
        ms = [section["runs"][p]["metrics"] for p in policies]
        one = lambda v: Stats(v, v, v, 1) if v == v else Stats(v, v, v, 0)  # noqa: E731
        paths.append(
            plot_bars(
                out_dir / f"scheduler_{key}_latency.png",
                f"{section['source']}: request latency by policy",
                policies,
                {"p50": [one(m["latency_p50_s"]) for m in ms], "p95": [one(m["latency_p95_s"]) for m in ms]},
                "seconds",
                f"SLO: {result['settings']['slo']}; failed requests are not in the latency bars",
            )
        )
        paths.append(
            plot_bars(
                out_dir / f"scheduler_{key}_goodput.png",
                f"{section['source']}: share of requests meeting the SLO",
                policies,
                {"goodput": [one(100 * m["goodput_fraction"]) for m in ms]},
                "% of requests",
                f"SLO: {result['settings']['slo']}",
            )
        )
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="the small model: 'default', an HF folder, .gguf or hub id")
    p.add_argument("--seed", type=int, default=7, help="trace seed (same seed, same trace)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals in the live trace")
    p.add_argument(
        "--policies", default="auto,gpu,npu,cpu", help="policies to replay (single-device ones skip absent devices)"
    )
    p.add_argument("--slo-ttft", type=float, default=2.0, help="SLO: time to first token, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="SLO: time per output token after the first, seconds")
    p.add_argument("--no-live", action="store_true", help="skip the live replay (simulations use profile rates)")
    p.add_argument("--no-sim", action="store_true", help="skip the trace simulations")
    p.add_argument("--quick", action="store_true", help="smoke run: a 6 s trace with short generations")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "scheduler.json", help="JSON path; plots go beside it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--cluster-fleet",
        action="store_true",
        help="only the simulated cluster fleet (1+4, 2+8, 4+16 GPU+NPU nodes); writes scheduler_cluster_fleet.json",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in ALL_POLICIES]
    if bad or not policies:
        parser.error(f"unknown policy {bad or args.policies!r}; choose from {', '.join(ALL_POLICIES)}")
    args.policies = policies
    if args.duration <= 0 or args.slo_ttft <= 0 or args.slo_tpot <= 0:
        parser.error("--duration, --slo-ttft and --slo-tpot must be positive")
    if not hasattr(os, "sched_setaffinity") and not args.no_live:
        parser.error("the live replay pins threads with os.sched_setaffinity (Linux); pass --no-live here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no stray tokenizer threads outside the pinned cores
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    note = busy_note()
    if note:
        console.print(f"[yellow]warning:[/] {note}")
    started = time.perf_counter()
    if args.cluster_fleet:
        with console.status("simulating cluster fleets") as status:
            fleet = cluster_fleet(args, lambda text: status.update(text))
        fleet["wall_s"] = time.perf_counter() - started
        print_cluster_fleet(fleet, console)
        out = write_json(args.out.with_name("scheduler_cluster_fleet.json"), fleet)
        console.print(f"wrote {out}")
        return 0
    with console.status("benchmarking the scheduler") as status:
        result = benchmark(args, lambda text: status.update(f"scheduler benchmark: {text}"))
    result["wall_s"] = time.perf_counter() - started
    console.print(f"trace: {result['trace']['shape']} ({result['trace']['requests']} requests, seed {args.seed})")
    console.print(f"models: {result['model_note']}")
    print_tables(result, console)
    if result["busy_warning"]:
        console.print(f"[yellow]warning:[/] {result['busy_warning']}")
    out = write_json(args.out, result)
    console.print(f"wrote {out}")
    if not args.no_plots:
        for path in make_plots(result, out.parent):
            console.print(f"wrote {path}")
    if out.parent.resolve() == RESULTS_DIR.resolve():  # the committed results: keep RESULTS.md in step
        from benchmarks.report import write_results_md

        console.print(f"wrote {write_results_md()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
