"""The load board: every device replica reports its device, health and queue here; the ingress reads it.

`place()` needs the whole cluster's load (queue depth, running requests, health per device) before it
chooses. Ray Serve's own replica statistics live inside each handle's router, out of the application's
reach, so the replicas push a small report every `REPORT_PERIOD_S` to this one-replica deployment and the
ingress reads the snapshot. A report older than `STALE_AFTER_S` means a replica that died without saying
goodbye; it is dropped, and a request that still reaches it fails before any token and is placed again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

REPORT_PERIOD_S = 0.5
STALE_AFTER_S = 10.0  # generous: a busy 2-core node may report late; a dead replica is re-placed anyway


@dataclass(frozen=True)
class ReplicaReport:
    """One device replica as the ingress needs to see it."""

    replica_id: str  # Ray Serve's unique replica id (what the request router targets)
    deployment: str  # the device class ("sim_gpu", "npu", ...)
    node_id: str  # Ray node id
    device: dict[str, Any]  # DeviceInfo.to_dict() of the device the replica's Engine is pinned to
    healthy: bool = True
    unhealthy_reason: str = ""
    active: int = 0  # requests generating
    waiting: int = 0  # requests queued for a slot
    capacity: int = 1  # concurrent requests the loaded backend runs
    # the rates the replica's own cost model has for its model there: (prefill tok/s, decode tok/s, prefill
    # samples, decode samples); measured once it has served requests, the device profile's prior before
    rates: tuple[float, float, int, int] | None = None
    actor_name: str = ""  # the replica's Ray actor (namespace "serve"), for operators: `ray.get_actor(name, "serve")`
    reported_at: float = field(default_factory=time.time)

    @property
    def node(self) -> str:
        """A short, readable node name for device ids and logs."""
        return self.node_id[:8]


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},  # two reports a second per replica
)
class LoadBoard:
    """Latest report per replica; tiny and in memory (a restart forgets, and the next reports refill it)."""

    def __init__(self) -> None:
        self.reports: dict[str, ReplicaReport] = {}

    def report(self, report: ReplicaReport) -> None:
        self.reports[report.replica_id] = report

    def forget(self, replica_id: str) -> None:
        self.reports.pop(replica_id, None)

    def snapshot(self) -> list[ReplicaReport]:
        now = time.time()
        self.reports = {k: r for k, r in self.reports.items() if now - r.reported_at <= STALE_AFTER_S}
        return sorted(self.reports.values(), key=lambda r: (r.deployment, r.node_id, r.replica_id))
