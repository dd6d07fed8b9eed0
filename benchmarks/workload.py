"""A seeded mixed request trace, per-request outcomes, SLO metrics, and a discrete-event replay through `place()`.

The same trace drives the live replay (real engine, disjoint cores) and the simulation (the real placement
function with service times from per-device rates), so the two can be checked against each other.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import percentile

SHORT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "Give me a fun fact about octopuses.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "What does HTTP stand for?",
    "Name the planets of the solar system.",
)
LONG_PROMPTS = (
    "Write a long story about a lighthouse keeper and a storm.",
    "Write a detailed guide to planting a vegetable garden, season by season.",
    "Describe the history of the printing press in detail.",
)


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float
    kind: str  # "chat" | "long" | "burst"
    model: str  # "small" | "large"
    prompt: str
    max_new_tokens: int
    prompt_tokens: int = 0  # filled in by the caller's tokenizer (placement needs it)


@dataclass(frozen=True)
class TraceShape:
    """What the trace is made of; rates are requests per second of trace time."""

    duration_s: float = 40.0
    chat_rate: float = 0.35
    long_rate: float = 0.05
    bursts: int = 2
    burst_size: int = 6
    burst_spread_s: float = 0.5
    large_share: float = 0.25  # fraction of chat/burst requests for the large model (long ones: always large)
    chat_tokens: tuple[int, int] = (24, 64)
    long_tokens: int = 512

    def describe(self) -> str:
        return (
            f"{self.duration_s:.0f} s of arrivals: short chats (Poisson {self.chat_rate}/s, {self.chat_tokens[0]}-"
            f"{self.chat_tokens[1]} new tokens), long generations (Poisson {self.long_rate}/s, {self.long_tokens} "
            f"new tokens), {self.bursts} bursts of {self.burst_size} chats within {self.burst_spread_s} s; "
            f"{self.large_share:.0%} of chats and every long generation go to the large model"
        )


def make_trace(shape: TraceShape, seed: int) -> list[TraceRequest]:
    """The same seed and shape give the same trace, on any machine."""
    rng = random.Random(seed)
    items: list[tuple[float, str]] = []
    for kind, rate in (("chat", shape.chat_rate), ("long", shape.long_rate)):
        t = 0.0
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= shape.duration_s:
                break
            items.append((t, kind))
    for _ in range(shape.bursts):
        start = rng.uniform(0.1 * shape.duration_s, 0.8 * shape.duration_s)
        items.extend((start + rng.uniform(0, shape.burst_spread_s), "burst") for _ in range(shape.burst_size))
    items.sort()
    out = []
    for i, (t, kind) in enumerate(items):
        if kind == "long":
            model, prompt, new = "large", rng.choice(LONG_PROMPTS), shape.long_tokens
        else:
            model = "large" if rng.random() < shape.large_share else "small"
            prompt, new = rng.choice(SHORT_PROMPTS), rng.randint(*shape.chat_tokens)
        out.append(TraceRequest(i, round(t, 3), kind, model, prompt, new))
    return out


# ---- outcomes and metrics ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one request; times in seconds from the trace start."""

    request: TraceRequest
    device_id: str | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    new_tokens: int = 0
    service_start_s: float | None = None  # when a device started on it (busy interval start)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.request.arrival_s

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.request.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.first_token_s is None or self.finish_s is None or self.new_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.new_tokens - 1)


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.1

    def met(self, o: Outcome) -> bool:
        if not o.ok or o.ttft_s is None or o.ttft_s > self.ttft_s:
            return False
        return o.tpot_s is None or o.tpot_s <= self.tpot_s

    def describe(self) -> str:
        return f"TTFT <= {self.ttft_s:g} s and time per output token <= {self.tpot_s * 1e3:g} ms"


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (a device serving 4 requests at once is busy once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def metrics(
    outcomes: Sequence[Outcome],
    slo: SLO,
    watts: Mapping[str, float],
    measured_joules: float | None = None,
    energy_source: str = "",
) -> dict[str, Any]:
    """Latency/TTFT percentiles, goodput, throughput and energy per token of one replay."""
    done = [o for o in outcomes if o.ok]
    start = min((o.request.arrival_s for o in outcomes), default=0.0)
    end = max((o.finish_s for o in done), default=start)
    makespan = max(end - start, 1e-9)
    tokens = sum(o.new_tokens for o in done)
    lat = [o.latency_s for o in done if o.latency_s is not None]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    good = sum(slo.met(o) for o in outcomes)
    per_device: dict[str, dict[str, Any]] = {}
    for o in done:
        d = per_device.setdefault(o.device_id or "?", {"requests": 0, "tokens": 0, "intervals": []})
        d["requests"] += 1
        d["tokens"] += o.new_tokens
        d["intervals"].append((o.service_start_s if o.service_start_s is not None else o.request.arrival_s, o.finish_s))
    estimated_j = 0.0
    for dev, d in per_device.items():
        d["busy_s"] = busy_seconds(d.pop("intervals"))
        d["watts"] = watts.get(dev, math.nan)
        estimated_j += d["busy_s"] * d["watts"]
    if measured_joules is not None:
        energy = {"joules": measured_joules, "per_token_j": measured_joules / tokens if tokens else math.nan}
        energy["source"] = energy_source or "measured"
    else:
        energy = {"joules": estimated_j, "per_token_j": estimated_j / tokens if tokens else math.nan}
        energy["source"] = energy_source or "estimated: device-profile watts x busy time"
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            key = (o.error or "unfinished").split(":")[0][:60]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": errors,
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "slo_met": good,
        "goodput_fraction": good / len(outcomes) if outcomes else math.nan,
        "goodput_rps": good / makespan,
        "throughput_tps": tokens / makespan,
        "tokens": tokens,
        "makespan_s": makespan,
        "energy": energy,
        "per_device": per_device,
    }


# ---- discrete-event replay --------------------------------------------------------------------------------


@dataclass
class _DeviceState:
    capacity: int
    active: int = 0
    queue: deque = field(default_factory=deque)  # (request, profile, precision)
    queued_tokens: int = 0


def simulate(
    trace: Sequence[TraceRequest],
    profiles: Mapping[str, Any],
    devices: Sequence[Any],
    policy: str,
    costs: Any,
    capacity: Mapping[str, int],
    place_fn: Callable[..., Any] | None = None,
) -> list[Outcome]:
    """Replay `trace` through the real placement function; service times from `costs` rates.

    Model of a device: `capacity` concurrent sequences (the backend's max batch), FIFO beyond that. A
    request admitted next to k others runs at decode_tps / (1 + slowdown * k) for its whole life and
    generates all max_new_tokens (a simplification: rates are fixed at admission and EOS is ignored).
    The scheduler sees the same load snapshot the engine would give it (queued and active requests,
    queued tokens) and the same rates that drive service, i.e. it predicts perfectly what it measured.
    """
    from plugin.engine.scheduler import DeviceLoad, PlacementError, PlacementRequest, place

    place_fn = place_fn or place
    by_id = {d.id: d for d in devices}
    state = {d.id: _DeviceState(capacity.get(d.kind, 4)) for d in devices}
    outcomes = {r.index: Outcome(r) for r in trace}
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    def admit(dev_id: str, now: float) -> None:
        st = state[dev_id]
        device = by_id[dev_id]
        while st.active < st.capacity and st.queue:
            req, profile, precision = st.queue.popleft()
            st.queued_tokens -= req.prompt_tokens + req.max_new_tokens
            rates = costs.rates(device, profile, precision)
            per_stream = rates.decode_tps / (1 + costs.batch_slowdown(device) * st.active)
            st.active += 1
            first = now + req.prompt_tokens / rates.prefill_tps + 1.0 / rates.decode_tps
            finish = first + (req.max_new_tokens - 1) / per_stream
            o = outcomes[req.index]
            o.service_start_s, o.first_token_s, o.finish_s, o.new_tokens = now, first, finish, req.max_new_tokens
            push(finish, "done", dev_id)

    for r in trace:
        push(r.arrival_s, "arrive", r)
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "done":
            state[payload].active -= 1
            admit(payload, now)
            continue
        req: TraceRequest = payload
        profile = profiles[req.model]
        load = {
            d: DeviceLoad(queued_requests=len(s.queue), active_requests=s.active, queued_tokens=s.queued_tokens)
            for d, s in state.items()
        }
        try:
            placement = place_fn(
                profile,
                devices,
                PlacementRequest(req.prompt_tokens, req.max_new_tokens),
                policy,
                load=load,
                costs=costs,
            )
        except PlacementError as e:
            outcomes[req.index].error = f"PlacementError: {e}"
            continue
        outcomes[req.index].device_id = placement.device_id
        st = state[placement.device_id]
        st.queue.append((req, profile, placement.precision))
        st.queued_tokens += req.prompt_tokens + req.max_new_tokens
        admit(placement.device_id, now)
    return [outcomes[r.index] for r in trace]
