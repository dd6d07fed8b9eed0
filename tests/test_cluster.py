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


# ---- without a cluster: resources, the command line, and the ingress's routing over fake replicas ----------


def test_devices_map_to_ray_resources_by_class():
    from plugin.cluster.resources import cluster_classes, device_class, node_resources
    from plugin.engine.devices import discover_cpu, parse_simulation

    cpu = discover_cpu()
    sims = parse_simulation("gpu:4GB,npu:8GB,npu:8GB")
    assert [device_class(d).name for d in sims] == ["sim_gpu", "sim_npu", "sim_npu"]
    assert device_class(cpu).resource == "accelserve_cpu"
    # an accelerator node does not offer its CPU unless asked; a plain CPU node does
    assert node_resources([cpu, *sims]) == {"accelserve_sim_gpu": 1.0, "accelserve_sim_npu": 2.0}
    assert node_resources([cpu]) == {"accelserve_cpu": 1.0}
    assert node_resources([cpu, *sims], serve_cpu=True)["accelserve_cpu"] == 1.0
    assert cluster_classes({"CPU": 4.0, "GPU": 2.0, "accelserve_sim_npu": 3.0, "memory": 1e9}) == {
        "gpu": 2,
        "sim_npu": 3,
    }


def test_a_local_cluster_serves_from_the_cpu_beside_its_accelerators(monkeypatch):
    """`serve --ray` without an address starts a one-node cluster: the CPU is the floor there, as on one machine
    (found by hand: with an emulated NPU advertised, the CPU was not, and a CPU-pinned request had no device)."""
    from plugin.cluster import app
    from plugin.engine.devices import discover_cpu, parse_simulation

    started: dict = {}
    monkeypatch.setattr(
        "plugin.engine.devices.discover_devices", lambda: [discover_cpu(), *parse_simulation("npu:8GB")]
    )
    monkeypatch.setattr(app.ray, "init", lambda **kw: started.update(kw))
    monkeypatch.setattr(app, "deploy", lambda *a, **kw: None)
    monkeypatch.setattr(app, "_wait_forever", lambda: None)
    monkeypatch.setattr(app.serve, "shutdown", lambda: None)
    monkeypatch.setattr(app.ray, "shutdown", lambda: None)
    app.serve_cluster(None, app.ClusterConfig(model="unused"))
    assert started["resources"] == {"accelserve_cpu": 1.0, "accelserve_sim_npu": 1.0}


def test_a_replica_claims_a_free_device_of_its_class(tmp_path):
    from plugin.cluster.replica import DeviceClaimError, claim_device
    from plugin.engine.devices import parse_simulation

    devices = parse_simulation("npu:8GB,npu:8GB")
    first, lock1 = claim_device("sim_npu", devices, tmp_path)
    second, lock2 = claim_device("sim_npu", devices, tmp_path)
    assert (first.index, second.index) == (0, 1)
    with pytest.raises(DeviceClaimError, match="held by another replica"):
        claim_device("sim_npu", devices, tmp_path)
    with pytest.raises(DeviceClaimError, match="without such a device"):
        claim_device("sim_gpu", devices, tmp_path)
    lock1.release()
    assert claim_device("sim_npu", devices, tmp_path)[0].index == 0
    lock2.release()


def test_serve_ray_refuses_what_it_cannot_do_before_starting_ray(capsys):
    from plugin.serve.cli import main

    assert main(["serve", "--ray", "--model", "a", "--model", "b"]) != 0
    assert "one model per application" in " ".join(capsys.readouterr().err.split())
    assert main(["serve", "--ray", "head:6379", "--isolate-backends"]) != 0
    assert "each device replica already runs in its own Ray process" in " ".join(capsys.readouterr().err.split())


def test_a_replica_fails_serves_health_check_when_its_device_is_unhealthy():
    from plugin.cluster.replica import DeviceReplica
    from plugin.engine.devices import parse_simulation

    class Engine:
        healthy, reason = True, ""

        def status(self):
            return [{"healthy": self.healthy, "unhealthy_reason": self.reason, "loaded": [], "active": 0, "waiting": 0}]

    replica = object.__new__(DeviceReplica.func_or_class)  # the class Ray Serve runs, without Ray
    replica.engine, replica.device, replica.class_name = Engine(), parse_simulation("npu:8GB")[0], "sim_npu"
    replica.check_health()  # healthy: returns, Serve keeps the replica
    replica.engine.healthy, replica.engine.reason = False, "onnxruntime-genai: its batching thread crashed"
    with pytest.raises(RuntimeError, match=r"npu:0 \(sim_npu\) is unhealthy: onnxruntime-genai: its batching"):
        replica.check_health()  # Serve stops this replica and starts another


class FakeStream:
    """What `handle.options(stream=True).generate.remote(...)` returns: items, then maybe a Ray error."""

    def __init__(self, items: list, error: BaseException | None) -> None:
        self.items, self.error, self.cancelled = list(items), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeReplicas:
    """A deployment handle over scripted replicas: {replica_id: (chunks to stream, error raised after them)}."""

    def __init__(self, script: dict) -> None:
        self.script, self.calls = script, []

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request, replica_id=None):
        self.calls.append(replica_id)
        items, error = self.script[replica_id]
        return FakeStream(items, error)


class FakeBoard:
    def __init__(self, reports) -> None:
        self.reports = reports

    @property
    def snapshot(self):
        return self

    async def remote(self):
        return self.reports


def fake_cluster(tiny_llama, script_for):
    """A ClusterEngine over two simulated GPUs on two nodes; `script_for(reports, placement)` scripts them."""
    from dataclasses import replace

    from plugin.cluster.board import ReplicaReport
    from plugin.cluster.engine import ClusterEngine
    from plugin.cluster.replica import Served
    from plugin.engine.costmodel import CostModel
    from plugin.engine.devices import parse_simulation
    from plugin.engine.engine import ChatChunk, RequestMetrics
    from plugin.engine.scheduler import Placement
    from plugin.models.resolve import resolve_model

    gpu = parse_simulation("gpu:4GB")[0]
    reports = [
        ReplicaReport(f"r{i}", "sim_gpu", f"{i}" * 8 + "ffff", gpu.to_dict(), capacity=8, actor_name=f"a{i}")
        for i in range(2)
    ]
    local = Placement("gpu", "gpu:0", "torch", "CPUExecutionProvider", "fp32", "replica's reason", True, 0.1, 10, ())

    def chunks(report, texts, final):
        out = [Served(report)]
        out += [ChatChunk(t, local, "req", completion_tokens=i + 1) for i, t in enumerate(texts)]
        if final:
            out.append(ChatChunk("", local, "req", "stop", RequestMetrics(new_tokens=len(texts))))
        return out

    handle = FakeReplicas(script_for(reports, chunks))
    engine = ClusterEngine(
        resolve_model(tiny_llama), {"sim_gpu": handle}, FakeBoard(reports), costs=CostModel(path=None)
    )
    engine.reports = reports
    return engine, handle, replace


async def collect(engine):
    from backends.base import GenerationRequest, SamplingParams

    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=4))
    return [c async for c in engine.astream(request)]


async def test_a_replica_lost_before_any_token_is_replaced_by_another(tiny_llama):
    from ray.exceptions import ActorDiedError

    def script(reports, chunks):
        return {
            "r0": (chunks(reports[0], [], False), ActorDiedError()),
            "r1": ([chunks(reports[1], [], False)[0], chunks(reports[1], ["a", "b"], True)[1:]], None),  # one list
        }

    engine, handle, _ = fake_cluster(tiny_llama, script)
    engine._inflight["r1"] = [10]  # r1 busier: place() picks r0 first
    got = await collect(engine)
    assert handle.calls == ["r0", "r1"]
    assert [c.text for c in got] == ["ab", ""] and got[-1].finish_reason == "stop"  # the list: one delta + end
    assert got[0].completion_tokens == 2
    placement = got[-1].placement
    assert placement.device_id == "gpu:0@11111111" and placement.fallback_from == ("gpu:0@00000000",)
    assert "replica lost before any token (ActorDiedError)" in placement.reason


def test_placement_uses_the_rates_each_replica_measured(tiny_llama):
    from dataclasses import replace

    from backends.base import GenerationRequest

    engine, _, _ = fake_cluster(tiny_llama, lambda reports, chunks: {})
    slow, fast = (200.0, 5.0, 3, 40), (200.0, 50.0, 3, 40)
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}])
    for rates, winner in (((slow, fast), "11111111"), ((fast, slow), "00000000")):
        engine.reports = [replace(r, rates=x) for r, x in zip(engine.reports, rates, strict=True)]
        placement = engine.predict(request, policy="latency")
        assert placement.device_id == f"gpu:0@{winner}"
        assert "measured (decode n=40" in placement.reason


async def test_a_replica_dying_mid_stream_ends_it_with_an_error(tiny_llama):
    from ray.exceptions import ActorDiedError

    def script(reports, chunks):
        return {"r0": (chunks(reports[0], ["a"], False), ActorDiedError()), "r1": ([], None)}

    engine, handle, _ = fake_cluster(tiny_llama, script)
    engine._inflight["r1"] = [10]
    got = await collect(engine)
    assert handle.calls == ["r0"]  # never sent again: its text was already streamed
    assert [c.text for c in got] == ["a", ""] and got[-1].finish_reason == "error"
    assert "stopped after 1 chunk(s)" in got[-1].error and "gpu:0@00000000" in got[-1].error
    assert not engine._inflight.get("r0")


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


@pytest.mark.slow  # shares the module's Ray cluster: ~1 min to start on 2 cores
def test_openai_client_streams_with_the_replicas_device(cluster):
    text, headers = chat(cluster)
    assert text  # a tiny random model says something
    device_id = headers["x-accelserve-device-id"]
    kind, _, node = device_id.partition("@")
    assert kind in ("gpu:0", "cpu:0") and len(node) == 8, device_id
    # honest labels across the cluster: the GPUs here are simulated and say so
    if kind == "gpu:0":
        assert headers["x-accelserve-simulated"] == "true" and headers["x-accelserve-device"] == "gpu"


@pytest.mark.slow  # shares the module's Ray cluster: ~1 min to start on 2 cores
def test_a_device_only_one_node_has_is_served_by_that_node(cluster):
    _, headers = chat(cluster, policy="cpu")
    assert headers["x-accelserve-device-id"] == f"cpu:0@{cluster['node_b'].node_id[:8]}"
    assert headers["x-accelserve-simulated"] == "false"


def replicas(deployment: str) -> list:
    """The live replicas of a device deployment, as they report themselves to the load board."""
    from ray import serve

    board = serve.get_deployment_handle("LoadBoard", app_name="accelserve")
    return [r for r in board.snapshot.remote().result() if r.deployment == deployment]


@pytest.mark.slow  # shares the module's Ray cluster: ~1 min to start on 2 cores
def test_killing_a_replica_moves_the_next_request_to_another(cluster):
    _, headers = chat(cluster, policy="gpu")
    node = headers["x-accelserve-device-id"].partition("@")[2]
    victims = [r for r in replicas("sim_gpu") if r.node == node]
    assert len(victims) == 1, f"expected one sim_gpu replica on node {node}: {replicas('sim_gpu')}"
    ray.kill(ray.get_actor(victims[0].actor_name, namespace="serve"), no_restart=True)
    text, headers = chat(cluster, policy="gpu")
    assert text
    assert headers["x-accelserve-device-id"].partition("@")[2] != node, headers["x-accelserve-device-id"]


@pytest.mark.slow  # shares the module's Ray cluster: ~1 min to start on 2 cores
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
