"""A Ray Serve request router that sends a request to the replica the ingress placed it on.

The ingress runs `place()` over the cluster and names the chosen replica in the call's `replica_id`
keyword. When that replica is no longer a candidate (it died, or is being replaced), the request goes to
the least-loaded live replica of the same deployment rather than waiting: the replica reports who it is
in every chunk, so the reply still names the device that really served it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class PinnedReplicaRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> Sequence[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        target = pending_request.kwargs.get("replica_id") if pending_request is not None else None
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # never spin while every replica is full
        if chosen:
            return [chosen]
        # the placed replica is gone: any live one, least queued first (Serve tries them in this order)
        queue = self.replica_queue_len_cache
        ranked = sorted(candidate_replicas, key=lambda r: queue.get(r.replica_id) or 0)
        return [[r] for r in ranked]
