"""Prometheus metrics for the HTTP server, kept in a registry per app so tests and several apps never collide."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets span a tiny model on a fast device (tens of ms) to a large model on the CPU (minutes).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Status label for a stream the client walked away from (nginx's "client closed request").
CLIENT_CLOSED = "499"


class ServerMetrics:
    """Request counters, token counters and latency histograms; device load is read from the engines at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "accelserve_requests",
            "Finished HTTP generation requests, by model, device that served them and HTTP status "
            "(499: the client disconnected mid-stream).",
            ["model", "device", "status", "endpoint"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "accelserve_generated_tokens", "Tokens generated.", ["model", "device"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "accelserve_prompt_tokens", "Prompt tokens processed.", ["model", "device"], registry=self.registry
        )
        self.ttft = Histogram(
            "accelserve_time_to_first_token_seconds",
            "Time from the request reaching the engine to its first generated token (engine-measured).",
            ["model", "device"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "accelserve_request_duration_seconds",
            "End-to-end time of a generation request as seen by the server, from arrival to last byte.",
            ["model", "device"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "accelserve_in_flight_requests",
            "Generation requests the server is handling now.",
            ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "accelserve_queue_depth",
            "Requests waiting for a slot on a device (sampled at scrape time).",
            ["model", "device"],
            registry=self.registry,
        )
        self.active = Gauge(
            "accelserve_active_requests",
            "Requests generating on a device (sampled at scrape time).",
            ["model", "device"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "accelserve_rejected_requests",
            "Requests refused by a server limit, by the limit (body_too_large, prompt_too_large, "
            "max_tokens_too_large, too_many_streams, queue_full, request_timeout, shutting_down).",
            ["reason"],
            registry=self.registry,
        )
        self.device_healthy = Gauge(
            "accelserve_device_healthy",
            "1 when the device is healthy, 0 while it is in back-off after a failure.",
            ["model", "device"],
            registry=self.registry,
        )

    def observe_request(
        self,
        *,
        model: str,
        device: str,
        status: int | str,
        endpoint: str,
        duration_s: float,
        ttft_s: float | None = None,
        new_tokens: int = 0,
        prompt_tokens: int = 0,
    ) -> None:
        """Record one finished request (successful or not)."""
        self.requests.labels(model=model, device=device, status=str(status), endpoint=endpoint).inc()
        if new_tokens:
            self.generated_tokens.labels(model=model, device=device).inc(new_tokens)
        if prompt_tokens:
            self.prompt_tokens.labels(model=model, device=device).inc(prompt_tokens)
        if ttft_s is not None:
            self.ttft.labels(model=model, device=device).observe(ttft_s)
        if device != "none":
            self.latency.labels(model=model, device=device).observe(duration_s)

    def render(self, engine_status: Mapping[str, list[dict[str, Any]]]) -> bytes:
        """The text exposition, after sampling each engine's per-device load."""
        for model, devices in engine_status.items():
            for d in devices:
                self.queue_depth.labels(model=model, device=d["device_id"]).set(d["waiting"])
                self.active.labels(model=model, device=d["device_id"]).set(d["active"])
                self.device_healthy.labels(model=model, device=d["device_id"]).set(1 if d["healthy"] else 0)
        return generate_latest(self.registry)
