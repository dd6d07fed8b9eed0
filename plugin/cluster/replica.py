"""A device replica: one `Engine` pinned to one device of one class, as a Ray Serve deployment.

Ray starts the replica on a node that has a free unit of the class's resource (plugin/cluster/resources.py);
the replica then finds that device among the node's own (real, emulated or simulated from the node's
ACCELSERVE_SIMULATE) and claims it with a lock file, so two replicas on a node with two NPUs take one each.
It reports its load to the board, fails Serve's health check when its backend is unhealthy (Serve then
replaces it), and streams the engine's chunks to the ingress.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from filelock import FileLock, Timeout
from ray import serve

from backends.base import GenerationRequest
from plugin.cluster.board import REPORT_PERIOD_S, ReplicaReport
from plugin.cluster.resources import CLASSES, device_class
from plugin.engine.devices import DeviceInfo, discover_devices
from plugin.engine.engine import ChatChunk, Engine
from plugin.models.resolve import resolve_model

log = logging.getLogger(__name__)


class DeviceClaimError(RuntimeError):
    """No free device of the replica's class on its node."""


_END = object()


@dataclass(frozen=True)
class Served:
    """The first item of every stream: the replica that took the request (before any token)."""

    report: ReplicaReport


def claim_device(class_name: str, devices: list[DeviceInfo], lock_dir: Path | None = None) -> tuple[DeviceInfo, Any]:
    """The first device of this class on this node that no other replica holds, and its held lock.

    The lock is an OS file lock: it is released when the replica's process dies, however it dies."""
    mine = [d for d in devices if device_class(d).name == class_name]
    if not mine:
        found = ", ".join(f"{d.id} ({device_class(d).name})" for d in devices)
        raise DeviceClaimError(
            f"Ray placed a {class_name} replica on a node without such a device (it has: {found}). The node's "
            f"`ray start --resources` advertises a device it does not have: start it with the output of "
            f"`python -m plugin.cluster.resources` under the same ACCELSERVE_SIMULATE"
        )
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / "accelserve-ray-devices"
    lock_dir.mkdir(parents=True, exist_ok=True)
    for d in mine:
        lock = FileLock(lock_dir / f"{class_name}-{d.index}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        return d, lock
    raise DeviceClaimError(
        f"every {class_name} device on this node ({len(mine)}) is held by another replica; the node advertises "
        f"more {CLASSES[class_name].resource} than it has devices"
    )


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=5, health_check_timeout_s=30)
class DeviceReplica:
    async def __init__(
        self,
        model_ref: str,
        class_name: str,
        board: Any,
        *,
        max_queue: int = 32,
        cpu_backend: str = "auto",
    ) -> None:
        self.class_name = class_name
        self.board = board
        self.node_id = ray.get_runtime_context().get_node_id()
        devices = await asyncio.to_thread(discover_devices)
        # locks per Ray node: several nodes may share one machine (and its temp dir), as in tests
        locks = Path(tempfile.gettempdir()) / "accelserve-ray-devices" / self.node_id
        self.device, self._lock = claim_device(class_name, devices, locks)
        kind = CLASSES[class_name].kind
        if class_name == "gpu":  # Ray's GPU ids and the index torch sees can differ: CUDA_VISIBLE_DEVICES
            log.info("Ray gave this replica GPU ids %s", ray.get_gpu_ids())
        model = await asyncio.to_thread(resolve_model, model_ref)
        self.engine = Engine(model, policy=kind, devices=[self.device], max_queue=max_queue, cpu_backend=cpu_backend)
        placement = await asyncio.to_thread(self.engine.preload)
        self.precision = placement.precision
        replica = serve.get_replica_context().replica_id
        self.replica_id, self.actor_name = replica.unique_id, replica.to_full_id_str()
        log.info(
            "replica %s on node %s serves %s on %s via %s (%s)",
            self.replica_id, self.node_id[:8], model_ref, self.device.id, placement.backend, placement.provider,
        )  # fmt: skip
        await self._report()
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        self._closed = False

    # ---- what the ingress calls -----------------------------------------------------------------
    async def generate(
        self, request: GenerationRequest, replica_id: str | None = None
    ) -> AsyncIterator[Served | list[ChatChunk]]:
        """Stream one request: who serves it first, then the engine's chunks in lists. `replica_id` is for the
        router. Every item crossing Ray costs CPU on both ends, so the chunks that arrived while the previous
        item was being sent travel together: one chunk per item when the ingress keeps up, more when it lags."""
        yield Served(self.report())
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for chunk in self.engine.astream(request):
                    queue.put_nowait(chunk)
                queue.put_nowait(_END)
            except Exception as e:  # raised again below, in the stream Ray sends back to the ingress
                queue.put_nowait(e)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                chunks = [c for c in items if isinstance(c, ChatChunk)]
                if chunks:
                    yield chunks
                if len(chunks) < len(items):
                    end = items[len(chunks)]
                    if isinstance(end, Exception):
                        raise end
                    return
        finally:
            task.cancel()

    def report(self) -> ReplicaReport:
        status = self.engine.status()[0]
        capacity = max((s["capacity"] for s in status["loaded"]), default=1)
        r = self.engine.costs.rates(self.device, self.engine.model.profile, self.precision)
        return ReplicaReport(
            replica_id=self.replica_id,
            deployment=self.class_name,
            node_id=self.node_id,
            device=self.device.to_dict(),
            healthy=bool(status["healthy"]),
            unhealthy_reason=status["unhealthy_reason"],
            active=status["active"],
            waiting=status["waiting"],
            capacity=capacity,
            rates=(r.prefill_tps, r.decode_tps, r.prefill_samples, r.decode_samples),
            actor_name=self.actor_name,
        )

    # ---- Ray Serve hooks ------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve stop this replica and start a new one."""
        status = self.engine.status()[0]
        if not status["healthy"]:
            raise RuntimeError(f"{self.device.id} ({self.class_name}) is unhealthy: {status['unhealthy_reason']}")

    async def _report(self) -> None:
        await self.board.report.remote(self.report())

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_PERIOD_S)
            try:
                await self._report()
            except Exception as e:  # the board restarting must not stop the replica; the next report retries
                log.warning("could not report load to the board: %s", e)

    def __del__(self) -> None:
        """Serve's graceful shutdown (also after a failed start: only what was built is closed). Synchronous, so
        that the garbage collector calling it again later is harmless."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._reporter.cancel()
        try:
            self.board.forget.remote(self.replica_id)  # sent now; nobody waits for the answer
        except Exception as e:  # the board is going away too; it drops stale reports on its own
            log.info("could not remove this replica from the board: %s", e)
        self.engine.close()
        self._lock.release()
