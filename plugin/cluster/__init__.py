"""Serve one endpoint over a cluster of machines with different accelerators, through Ray Serve.

Ray Serve provides what a cluster needs (membership, replica placement by resources, health checks,
restarts, autoscaling); this package only maps accelserve's devices onto it and routes each request with
the same `place()` as on one machine. Ray is an optional extra (`pip install accelserve[ray]`): nothing
outside this package imports it, and `plugin.cluster.resources` works without it.
"""
