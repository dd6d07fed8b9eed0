"""The Ray Serve application: a load board, one deployment per device class, and the OpenAI ingress.

    Ingress (FastAPI from plugin/serve/server.py, over a ClusterEngine)
      ├─ LoadBoard                    replicas' load and health, read by the ingress
      └─ one DeviceReplica deployment per device class in the cluster ("sim_gpu", "npu", "cpu", ...)
           each replica: one Engine pinned to one device, started by Ray where that class's resource is

Autoscaling is Ray Serve's, on ongoing requests per replica (queued + running, the queue depth): between
`min_replicas` and the number of devices of the class in the cluster. Health checks are the replicas'
`check_health` (unhealthy backend -> Serve replaces the replica).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from plugin.cluster.board import LoadBoard
from plugin.cluster.engine import ClusterEngine
from plugin.cluster.replica import DeviceReplica
from plugin.cluster.resources import CLASSES, cluster_classes, node_resources
from plugin.cluster.router import PinnedReplicaRouter
from plugin.models.resolve import resolve_model
from plugin.serve.limits import ServerLimits
from plugin.serve.server import API_KEY_ENV, check_bind, create_app

log = logging.getLogger(__name__)

APP_NAME = "accelserve"


@dataclass
class ClusterConfig:
    """What `accelserve serve --ray` deploys."""

    model: str = "default"
    policy: str = "auto"
    api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    cpu_backend: str = "auto"
    # {class name: devices of it}; None: every class the cluster's resources advertise
    classes: Mapping[str, int] | None = None
    min_replicas: int | None = None  # per class; None: one replica per device from the start (no scale-down)
    target_ongoing_requests: float = 2.0  # Serve adds a replica when the queue per replica stays above this


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    """The OpenAI-compatible API of plugin/serve/server.py, over the cluster's replicas."""

    async def __init__(self, config: ClusterConfig, handles: dict[str, Any], board: Any) -> None:
        model = await asyncio.to_thread(resolve_model, config.model)
        self.engine = ClusterEngine(model, handles, board, policy=config.policy, cpu_backend=config.cpu_backend)
        await self.engine.start()
        self._api = create_app({config.model: self.engine}, api_key=config.api_key, limits=config.limits)

    def __serve_build_asgi_app__(self) -> Any:
        return self._api

    def __del__(self) -> None:
        if hasattr(self, "engine"):
            self.engine.close()


def class_options(name: str, devices: int, config: ClusterConfig) -> dict[str, Any]:
    """Serve options of one device class's deployment: its resource, autoscaling, router, queue."""
    if name not in CLASSES:
        raise ValueError(f"unknown device class {name!r}; known: {', '.join(CLASSES)}")
    if devices < 1:
        raise ValueError(f"device class {name!r} needs at least one device in the cluster (got {devices})")
    cls = CLASSES[name]
    actor: dict[str, Any] = {"num_cpus": 0}
    if cls.resource == "GPU":
        actor["num_gpus"] = 1
    else:
        actor["resources"] = {cls.resource: 1}
    low = devices if config.min_replicas is None else max(0, min(config.min_replicas, devices))
    return {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": config.limits.max_queue + 8,  # the engine queues and refuses beyond max_queue
        "autoscaling_config": {
            "min_replicas": low,
            "initial_replicas": devices,
            "max_replicas": devices,
            "target_ongoing_requests": config.target_ongoing_requests,
        },
        "request_router_config": RequestRouterConfig(request_router_class=PinnedReplicaRouter),
    }


def build_app(config: ClusterConfig, classes: Mapping[str, int]) -> Any:
    """The bound application for `serve.run`."""
    if not classes:
        raise ValueError(
            "the cluster advertises no accelserve device: start each node with "
            '`ray start ... --resources "$(python -m plugin.cluster.resources)"` (see docs/cluster.md)'
        )
    board = LoadBoard.bind()
    handles = {
        name: DeviceReplica.options(**class_options(name, n, config)).bind(
            config.model, name, board, max_queue=config.limits.max_queue, cpu_backend=config.cpu_backend
        )
        for name, n in sorted(classes.items())
    }
    return Ingress.bind(config, handles, board)


def deploy(config: ClusterConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False) -> Any:
    """Deploy on the cluster this process is connected to (`ray.init` first); returns the ingress handle."""
    classes = dict(config.classes) if config.classes is not None else cluster_classes(ray.cluster_resources())
    log.info("device classes in the cluster: %s", classes or "none")
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(config, classes), name=APP_NAME, route_prefix="/", blocking=blocking)


def serve_cluster(
    address: str | None,
    config: ClusterConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_insecure: bool = False,
) -> None:
    """`accelserve serve --ray [ADDRESS]`: join the cluster at ADDRESS (or start a local one advertising this
    machine's devices), deploy, and serve until interrupted."""
    config.api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(host, config.api_key, allow_insecure)
    if address:
        ray.init(address=address)
    else:
        from plugin.engine.devices import discover_devices

        # A local cluster is this machine alone: its CPU is the floor, as in the single-machine server.
        resources = node_resources(discover_devices(), serve_cpu=True)
        log.info("starting a local Ray cluster with this machine's devices: %s", resources)
        ray.init(resources=resources, include_dashboard=False)
    try:
        deploy(config, host, port, blocking=False)
        log.info("serving %s on http://%s:%d/v1 through Ray Serve (Ctrl-C stops)", config.model, host, port)
        _wait_forever()
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_forever() -> None:
    """Until Ctrl-C or SIGTERM (a service manager's stop); either ends in the caller's `serve.shutdown()`."""
    import signal
    import time

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: removing the application from the cluster")
