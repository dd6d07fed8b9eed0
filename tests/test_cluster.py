"""`accelserve serve --ray`: a local two-node Ray cluster (one Ray process per node, on this machine), tiny
models, the official openai client against the Ray Serve ingress.

Node A advertises a simulated GPU; node B a simulated GPU and its CPU. So a request pinned to the CPU can
only be served by node B, and the two simulated GPUs are two replicas of one deployment on two nodes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install accelserve[ray]")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # starts a Ray cluster and three replicas: about a minute on 2 cores

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 100 * 2**20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_machine_paths_do_not_import_ray():
    code = (
        "import sys, plugin, plugin.serve.server, plugin.serve.cli, plugin.engine.engine, plugin.cluster.resources; "
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    """Two Ray nodes with different devices, and the accelserve application deployed on them."""
    from ray import serve
    from ray.cluster_utils import Cluster

    from plugin.cluster.app import ClusterConfig, deploy

    env = {
        "ACCELSERVE_HOME": str(tmp_path_factory.mktemp("cluster-home")),
        "ACCELSERVE_SIMULATE": "gpu:4GB",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    try:
        nodes = Cluster(
            initialize_head=True,
            head_node_args={
                **NODE_ARGS,
                "include_dashboard": False,
                "resources": {"accelserve_sim_gpu": 1},
                "env_vars": env,
            },
        )
        node_b = nodes.add_node(**NODE_ARGS, resources={"accelserve_sim_gpu": 1, "accelserve_cpu": 1}, env_vars=env)
        ray.init(address=nodes.address, logging_level="warning", log_to_driver=False)
    except Exception as e:  # no shared memory, no free ports, a sandbox without fork...
        pytest.skip(f"Ray cannot start a local cluster here: {type(e).__name__}: {e}")
    port = free_port()
    t0 = time.perf_counter()
    try:
        deploy(ClusterConfig(model=str(tiny_llama), cpu_backend="torch"), port=port)
        print(f"cluster deployed in {time.perf_counter() - t0:.1f} s")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        yield {"client": client, "url": f"http://127.0.0.1:{port}", "model": str(tiny_llama), "node_b": node_b}
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def chat(cluster, policy: str | None = None, stream: bool = True):
    """One short streamed chat; returns (text, the response headers)."""
    extra = {"accelserve_policy": policy} if policy else None
    response = cluster["client"].chat.completions.with_raw_response.create(
        model=cluster["model"],
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        stream=stream,
        extra_body=extra,
    )
    stream_ = response.parse()
    text = "".join(c.choices[0].delta.content or "" for c in stream_ if c.choices)
    return text, response.headers


def test_openai_client_streams_with_the_replicas_device(cluster):
    text, headers = chat(cluster)
    assert text  # a tiny random model says something
    device_id = headers["x-accelserve-device-id"]
    kind, _, node = device_id.partition("@")
    assert kind in ("gpu:0", "cpu:0") and len(node) == 8, device_id
    # honest labels across the cluster: the GPUs here are simulated and say so
    if kind == "gpu:0":
        assert headers["x-accelserve-simulated"] == "true" and headers["x-accelserve-device"] == "gpu"


def test_a_device_only_one_node_has_is_served_by_that_node(cluster):
    _, headers = chat(cluster, policy="cpu")
    assert headers["x-accelserve-device-id"] == f"cpu:0@{cluster['node_b'].node_id[:8]}"
    assert headers["x-accelserve-simulated"] == "false"


def replicas(deployment: str) -> list:
    """The live replicas of a device deployment, as they report themselves to the load board."""
    from ray import serve

    board = serve.get_deployment_handle("LoadBoard", app_name="accelserve")
    return [r for r in board.snapshot.remote().result() if r.deployment == deployment]


def test_killing_a_replica_moves_the_next_request_to_another(cluster):
    _, headers = chat(cluster, policy="gpu")
    node = headers["x-accelserve-device-id"].partition("@")[2]
    victims = [r for r in replicas("sim_gpu") if r.node == node]
    assert len(victims) == 1, f"expected one sim_gpu replica on node {node}: {replicas('sim_gpu')}"
    ray.kill(ray.get_actor(victims[0].actor_name, namespace="serve"), no_restart=True)
    text, headers = chat(cluster, policy="gpu")
    assert text
    assert headers["x-accelserve-device-id"].partition("@")[2] != node, headers["x-accelserve-device-id"]


def test_metrics_count_requests_from_every_replica(cluster):
    before = served_by_device(cluster)
    for policy in ("cpu", "gpu", "cpu"):
        chat(cluster, policy=policy)
    after = served_by_device(cluster)
    gained = {d: after.get(d, 0) - before.get(d, 0) for d in after}
    assert sum(gained.values()) == 3, gained
    assert sum(1 for n in gained.values() if n) >= 2, gained  # the CPU replica and a GPU replica
    # the queue depth and health of every replica are in the ingress's /metrics too
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(cluster["url"] + "/metrics").text)}
    healthy = {s.labels["device"] for s in families["accelserve_device_healthy"].samples}
    assert any(d.startswith("cpu:0@") for d in healthy) and any(d.startswith("gpu:0@") for d in healthy)


def served_by_device(cluster) -> dict[str, float]:
    text = httpx.get(cluster["url"] + "/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "accelserve_requests":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels["status"] == "200":
                    out[s.labels["device"]] = out.get(s.labels["device"], 0) + s.value
    return out
