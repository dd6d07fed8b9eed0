"""`accelserve serve --ray [ADDRESS]`: the serve command's options, deployed through Ray Serve."""

from __future__ import annotations

import argparse
import importlib.util

from plugin.serve.limits import ServerLimits


def serve_on_ray(args: argparse.Namespace, limits: ServerLimits) -> int:
    """Check what the cluster path cannot do yet before touching Ray, then deploy and serve."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ValueError("--ray needs Ray Serve: pip install 'accelserve[ray]' (ray[serve]==2.60.0)")
    models = args.model or ["default"]
    if len(models) != 1:
        raise ValueError(f"--ray serves one model per application (got {models}); run one `serve --ray` per model")
    if args.isolate_backends:
        raise ValueError(
            "--isolate-backends does not apply to --ray: each device replica already runs in its own Ray process"
        )
    from plugin.cluster.app import ClusterConfig, serve_cluster

    config = ClusterConfig(
        model=models[0], policy=args.policy, api_key=args.api_key, limits=limits, cpu_backend=args.cpu_backend
    )
    serve_cluster(args.ray or None, config, host=args.host, port=args.port, allow_insecure=args.insecure_no_api_key)
    return 0
