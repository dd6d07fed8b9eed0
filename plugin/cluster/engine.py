"""The cluster seen as one `Engine` by the HTTP server: the ingress hands it to `create_app` unchanged.

`create_app` (plugin/serve/server.py) needs an engine's `model`, `policy`, `astream`, `status`,
`prompt_encoder` and `preload`. This class provides them over the device replicas of a Ray Serve
application: each request is tokenized once here, placed by the same `place()` as on one machine over
every live replica (one device each, with the load and health from the board, plus what this ingress has
in flight), sent to that replica, and its chunks carry a placement naming the device and its node
(`gpu:0@1a2b3c4d`).

Failures: a replica that dies, is gone, is overloaded or whose device fails before streaming any token is
excluded and the request is placed again; one that dies after tokens were streamed ends the stream with an
error chunk (the server turns it into an error event), never a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray.exceptions import RayError, RayTaskError

from backends.base import GenerationRequest
from backends.prompt import PromptEncoder
from plugin.cluster.board import REPORT_PERIOD_S, ReplicaReport
from plugin.cluster.replica import Served
from plugin.engine.costmodel import CostModel, Rates
from plugin.engine.devices import DeviceInfo
from plugin.engine.engine import ChatChunk, EngineError, NoDeviceAvailable, Overloaded, RequestMetrics
from plugin.engine.scheduler import DeviceLoad, Placement, PlacementError, PlacementRequest, place
from plugin.models.resolve import ResolvedModel

log = logging.getLogger(__name__)

_DEVICE_ID = re.compile(r"\b(gpu|npu|cpu):(\d+)\b")


def cluster_device_id(report: ReplicaReport) -> str:
    """A replica's device as users see it: the device id on its node, then the node."""
    return f"{report.device['id']}@{report.node}"


@dataclasses.dataclass
class Inventory:
    """The cluster as `place()` takes it: one device per live replica, numbered per kind across the cluster."""

    devices: list[DeviceInfo]
    load: dict[str, DeviceLoad]
    reports: dict[str, ReplicaReport]  # place()'s device id -> the replica

    def rename(self, text: str) -> str:
        """place()'s device ids in a sentence -> the cluster's (device@node)."""

        def sub(m: re.Match[str]) -> str:
            report = self.reports.get(m.group(0))
            return cluster_device_id(report) if report is not None else m.group(0)

        return _DEVICE_ID.sub(sub, text)


def merged(chunks: list[ChatChunk]) -> list[ChatChunk]:
    """Chunks that arrived together as one (their text and logprobs joined, the last one's counts), then the
    final chunk on its own: fewer, larger stream events, each still a valid OpenAI delta."""
    body = [c for c in chunks if c.finish_reason is None]
    tail = [c for c in chunks if c.finish_reason is not None]
    if len(body) <= 1:
        return chunks
    logprobs = [lp for c in body for lp in (c.logprobs or [])]
    one = dataclasses.replace(body[-1], text="".join(c.text for c in body), logprobs=logprobs or None)
    return [one, *tail]


class ReportedCosts:
    """The ingress's cost model: each replica's own rates for its device (measured where it has served), the
    ingress's model otherwise. The replicas measure; the ingress, which runs nothing, only predicts."""

    def __init__(self, base: CostModel, inv: Inventory, model_name: str) -> None:
        self.base, self.inv, self.model_name = base, inv, model_name

    def rates(self, device: DeviceInfo, model: Any, precision: str) -> Rates:
        report = self.inv.reports.get(device.id)
        if report is None or report.rates is None or model.name != self.model_name:
            return self.base.rates(device, model, precision)
        prefill, decode, n_prefill, n_decode = report.rates
        return Rates(prefill, decode, n_prefill, n_decode)

    def watts(self, device: DeviceInfo) -> float:
        return self.base.watts(device)

    def batch_slowdown(self, device: DeviceInfo) -> float:
        return self.base.batch_slowdown(device)


class ClusterEngine:
    """An Engine-shaped router over the device deployments of one model."""

    def __init__(
        self,
        model: ResolvedModel,
        handles: Mapping[str, Any],
        board: Any,
        *,
        policy: str = "auto",
        cpu_backend: str = "auto",
        costs: CostModel | None = None,
    ) -> None:
        if not handles:
            raise ValueError("ClusterEngine needs at least one device deployment handle: {class name: handle}")
        self.model = model
        self.policy = policy
        self.cpu_backend = cpu_backend
        self.handles = dict(handles)
        self.board = board
        self.costs = costs if costs is not None else CostModel.load_default()
        self.reports: list[ReplicaReport] = []
        self._inflight: dict[str, list[int]] = defaultdict(list)  # replica id -> kv tokens this ingress sent
        self._encoder: PromptEncoder | None = None
        self._tokenizer_lock = threading.Lock()
        self._refresher: asyncio.Task[None] | None = None

    # ---- the board ---------------------------------------------------------------------------
    async def start(self, wait_s: float = 60.0) -> None:
        """Read the board until at least one replica reported (or `wait_s` passed), then keep reading it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        await self.refresh()
        while not self.reports and loop.time() < deadline:
            await asyncio.sleep(REPORT_PERIOD_S)
            await self.refresh()
        self._refresher = loop.create_task(self._refresh_forever())

    async def refresh(self) -> None:
        self.reports = list(await self.board.snapshot.remote())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_PERIOD_S)
            try:
                await self.refresh()
            except Exception as e:  # the board restarting: keep the last snapshot, try again
                log.warning("could not read the load board: %s", e)

    def inventory(self) -> Inventory:
        """The live replicas as devices with their load (reported, or what this ingress sent, whichever is more)."""
        devices, load, reports = [], {}, {}
        per_kind: dict[str, int] = defaultdict(int)
        for r in self.reports:
            if r.deployment not in self.handles:
                continue
            d = r.device
            kind = d["kind"]
            device = DeviceInfo(
                kind=kind,
                name=d["name"],
                memory_bytes=d["memory_bytes"],
                backends=tuple(d["backends"]),
                providers=tuple(d["providers"]),
                simulated=d["simulated"],
                index=per_kind[kind],
                details=d["details"],
                emulated=d["emulated"],
            )
            per_kind[kind] += 1
            sent = self._inflight.get(r.replica_id, [])
            inflight = max(r.active + r.waiting, len(sent))
            active = min(inflight, r.capacity)
            queued = inflight - active
            mean_kv = sum(sent) // len(sent) if sent else 0
            devices.append(device)
            reports[device.id] = r
            load[device.id] = DeviceLoad(
                queued_requests=queued,
                active_requests=active,
                queued_tokens=queued * mean_kv,
                healthy=r.healthy,
                unhealthy_reason=r.unhealthy_reason,
            )
        return Inventory(devices, load, reports)

    # ---- Engine's surface for the server ---------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """One entry per replica, shaped like Engine.status() (for /health and /metrics)."""
        out = []
        for r in self.reports:
            out.append(
                {
                    "device_id": cluster_device_id(r),
                    "kind": r.device["kind"],
                    "name": r.device["name"],
                    "simulated": r.device["simulated"],
                    "emulated": r.device["emulated"],
                    "healthy": r.healthy,
                    "unhealthy_reason": r.unhealthy_reason,
                    "loaded": [],
                    "active": r.active,
                    "waiting": r.waiting,
                    "node_id": r.node_id,
                    "replica_id": r.replica_id,
                    "deployment": r.deployment,
                }
            )
        return out

    def prompt_encoder(self) -> PromptEncoder:
        with self._tokenizer_lock:
            if self._encoder is None:
                self._encoder = PromptEncoder.from_folder(self.model.path)
            return self._encoder

    def _placement_request(self, request: GenerationRequest) -> PlacementRequest:
        if request.prompt_ids is None:  # tokenized once, here: the replicas receive the ids
            request.prompt_ids = self.prompt_encoder().encode(request)
        return PlacementRequest(prompt_tokens=len(request.prompt_ids), max_new_tokens=request.sampling.max_new_tokens)

    def predict(self, request: GenerationRequest, policy: str | None = None) -> Placement:
        """Where this request would go now, without running it (named as the cluster names devices)."""
        inv = self.inventory()
        placement = self._place(inv, self._placement_request(request), policy or self.policy, ())
        return self._named(placement, inv)

    def preload(self, policy: str | None = None) -> Placement:
        """The replicas loaded their backends when they started; this only says where a short chat would go."""
        return self.predict(GenerationRequest(messages=[{"role": "user", "content": "Hello"}]), policy)

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()

    # ---- placing and streaming -------------------------------------------------------------------
    def _place(self, inv: Inventory, preq: PlacementRequest, policy: str, exclude: tuple[str, ...]) -> Placement:
        if not inv.devices:
            raise NoDeviceAvailable(
                "no device replica has reported yet: the cluster has none running (see `serve status`), or they "
                "are still loading; retry shortly"
            )
        excluded = [k for k, r in inv.reports.items() if r.replica_id in exclude]
        try:
            return place(
                self.model.profile,
                inv.devices,
                preq,
                policy,
                load=inv.load,
                costs=ReportedCosts(self.costs, inv, self.model.profile.name),  # type: ignore[arg-type]
                exclude=excluded,
                cpu_backend=self.cpu_backend,
            )
        except PlacementError as e:
            raise NoDeviceAvailable(inv.rename(str(e))) from e

    def _named(self, p: Placement, inv: Inventory) -> Placement:
        """place()'s numbering -> the cluster's names, in the id, the reason and the alternatives."""
        alts = tuple(
            dataclasses.replace(
                a,
                device_id=cluster_device_id(inv.reports[a.device_id]) if a.device_id in inv.reports else a.device_id,
                why=inv.rename(a.why),
            )
            for a in p.alternatives
        )
        report = inv.reports[p.device_id]
        return dataclasses.replace(
            p, device_id=cluster_device_id(report), reason=inv.rename(p.reason), alternatives=alts
        )

    async def astream(self, request: GenerationRequest, *, policy: str | None = None) -> AsyncIterator[ChatChunk]:
        """Place, send, stream; re-place on a replica failure before the first token."""
        preq = await asyncio.to_thread(self._placement_request, request)
        kv = preq.prompt_tokens + preq.max_new_tokens
        tried: list[str] = []  # replica ids
        failures: list[str] = []
        overloaded: Overloaded | None = None
        while True:
            inv = self.inventory()
            try:
                chosen = self._place(inv, preq, policy or self.policy, tuple(tried))
            except NoDeviceAvailable as e:
                if overloaded is not None and len(failures) == len(tried):
                    raise overloaded from e
                detail = f" Tried: {'; '.join(failures)}." if failures else ""
                raise NoDeviceAvailable(f"{e}{detail}") from e
            report = inv.reports[chosen.device_id]
            target = cluster_device_id(report)
            handle = self.handles[report.deployment]
            stream = handle.options(stream=True).generate.remote(request, replica_id=report.replica_id)
            served = report
            placement: Placement | None = None
            streamed = 0
            finished = False
            self._inflight[report.replica_id].append(kv)
            try:
                async for item in stream:
                    if isinstance(item, Served):
                        served = item.report
                        continue
                    for chunk in merged(item if isinstance(item, list) else [item]):
                        if placement is None:
                            placement = self._as_served(chunk.placement, chosen, inv, served, failures, tried)
                        streamed += 1 if chunk.text or chunk.completion_tokens else 0
                        finished = chunk.finish_reason is not None
                        yield dataclasses.replace(chunk, placement=placement)
                        if finished:
                            return
                if not finished:
                    raise EngineError(f"the replica on {target} ended the stream without a final chunk")
                return
            except RayTaskError as e:  # raised by the replica's own code
                cause = e.cause if isinstance(e.cause, Exception) else EngineError(str(e))
                if streamed or isinstance(cause, ValueError) or not isinstance(cause, EngineError):
                    raise cause from None
                if isinstance(cause, Overloaded):
                    overloaded = cause
                failures.append(f"{target}: {cause}")
                tried.append(report.replica_id)
                log.warning("%s refused a request before any token (%s); placing it again", target, cause)
            except RayError as e:  # the replica died or could not be reached
                where = cluster_device_id(served)
                if streamed or placement is not None:
                    log.warning("replica %s on %s died mid-stream: %s", served.replica_id, where, e)
                    yield ChatChunk(
                        "",
                        placement or self._named(chosen, inv),
                        request.request_id,
                        "error",
                        RequestMetrics(new_tokens=streamed),
                        error=(
                            f"the replica serving this request ({where}) stopped after {streamed} chunk(s) had been "
                            f"streamed ({type(e).__name__}); the reply is incomplete, send the request again"
                        ),
                    )
                    return
                failures.append(f"{where}: replica lost before any token ({type(e).__name__})")
                tried.append(served.replica_id)
                if served.replica_id != report.replica_id:
                    tried.append(report.replica_id)
                log.warning("replica %s on %s failed before any token (%s); placing again", served.replica_id, where, e)
            finally:
                self._inflight[report.replica_id].remove(kv)
                if not self._inflight[report.replica_id]:
                    del self._inflight[report.replica_id]
                if not finished:
                    stream.cancel()

    def _as_served(
        self,
        engine_placement: Placement,
        chosen: Placement,
        inv: Inventory,
        served: ReplicaReport,
        failures: list[str],
        tried: list[str],
    ) -> Placement:
        """The replica's own placement (what really ran), named for the cluster and saying why it was chosen."""
        where = cluster_device_id(served)
        named = self._named(chosen, inv)
        if served.replica_id != inv.reports[chosen.device_id].replica_id:
            why = f"Placed on {named.device_id}, which was gone, so Ray Serve sent it to {where} (same class)."
        else:
            why = f"Cluster placement over {len(inv.devices)} replica(s): {named.reason}"
        reason = f"{why} On node {served.node}, replica {served.replica_id}: {engine_placement.reason}"
        if failures:
            reason += " Placed again after: " + "; ".join(failures) + "."
        tried_ids = {r.replica_id: cluster_device_id(r) for r in self.reports}
        return dataclasses.replace(
            engine_placement,
            device_id=where,
            reason=reason,
            alternatives=named.alternatives,
            fallback_from=tuple(tried_ids.get(t, t) for t in tried),
        )
