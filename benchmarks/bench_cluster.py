"""`accelserve serve --ray` on a local two-node Ray cluster: one replica vs two, and a replica killed mid-run.

    python benchmarks/bench_cluster.py                 # default model, 24 requests, 4 concurrent streams
    python benchmarks/bench_cluster.py --quick         # 8 requests, short replies

Two `ray start --block` processes on disjoint cores (taskset): node A on core 0 advertises a simulated GPU
(torch, 1 thread), node B on core 1 a simulated NPU (onnxruntime-genai). Both are simulated devices: they
execute on the CPU provider, each on its own core, so capacity is real if small. Ray Serve's controller,
proxy, ingress and load board run on node A's core too (the head), next to its replica.

The same seeded trace (prompts, max_tokens, temperature 0) is sent with a fixed number of concurrent streams:
1. pinned to the simulated GPU (one replica), 2. pinned to the simulated NPU (one replica), 3. `auto` over
both, and `latency` over both. Scaling efficiency = throughput of both / (GPU alone + NPU alone): the
devices differ, so 1.0 means the two replicas add up perfectly. 4. `auto` over both again, with the busiest
replica killed (ray.kill; Ray Serve starts a new one) once a third of the requests finished. Every request
is then one of: ok, error event (died mid-stream: the reply ends with an error event, as it must), lost
(an HTTP error or an exception before any text), hung (no end within the client timeout).
Writes benchmarks/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, busy_note, machine_info, percentile, write_json
from benchmarks.workload import SHORT_PROMPTS

log = logging.getLogger("bench_cluster")

NODES = (  # (core, simulated devices, Ray resources)
    ("0", "gpu:8GB", {"accelserve_sim_gpu": 1}),
    ("1", "npu:8GB", {"accelserve_sim_npu": 1}),
)
CLIENT_TIMEOUT_S = 300.0


@dataclass
class Result:
    """One request's outcome as the client saw it."""

    index: int
    status: str  # ok | error_event | lost | hung
    device_id: str = ""
    latency_s: float = 0.0
    ttft_s: float | None = None
    completion_tokens: int = 0
    detail: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trace(n: int, seed: int, tokens: tuple[int, int]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(SHORT_PROMPTS), "max_tokens": rng.randint(*tokens)} for _ in range(n)]


class TwoNodeCluster:
    """Two Ray nodes started with `ray start --block`, each under taskset; stopping ends only these processes."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.temp = Path(tempfile.mkdtemp(prefix="acr"))  # short: Ray's socket paths have a length limit
        self.home = home
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> str:
        ray_cli = str(Path(sys.executable).parent / "ray")
        address = f"127.0.0.1:{self.port}"
        for i, (core, simulate, resources) in enumerate(NODES):
            env = {
                **os.environ,
                "ACCELSERVE_SIMULATE": simulate,
                "ACCELSERVE_HOME": str(self.home),
                "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
            role = (
                ["--head", f"--port={self.port}", "--include-dashboard=false"] if i == 0 else [f"--address={address}"]
            )
            cmd = [
                "taskset", "-c", core, ray_cli, "start", "--block", *role, "--num-cpus=1",
                "--object-store-memory=200000000", f"--resources={json.dumps(resources)}", f"--temp-dir={self.temp}",
            ]  # fmt: skip
            log.info("starting node %d on core %s with %s", i, core, simulate)
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            time.sleep(8 if i == 0 else 0)  # the head must listen before the worker joins
        return address

    def wait_for_resources(self, timeout_s: float = 180.0) -> None:
        """Until every node has joined with its devices (a worker node joins a few seconds after the head)."""
        import ray

        wanted = {k for _, _, resources in NODES for k in resources}
        deadline = time.monotonic() + timeout_s
        while not wanted <= set(ray.cluster_resources()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes did not join within {timeout_s:.0f} s: have {ray.cluster_resources()}")
            time.sleep(1)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()  # `ray start --block` stops its node's processes when it is terminated
        for p in reversed(self.procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


async def one(client: Any, url: str, model: str, i: int, item: dict[str, Any], policy: str) -> Result:
    """Stream one chat; classify how it ended."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": item["prompt"]}],
        "max_tokens": item["max_tokens"],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "accelserve_policy": policy,
    }
    t0 = time.perf_counter()
    res = Result(i, "lost")
    text = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            res.device_id = r.headers.get("x-accelserve-device-id", "")
            if r.status_code != 200:
                res.detail = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.status = "error_event" if text else "lost"
                    res.detail = event["error"]["message"][:300]
                    return res
                if event.get("usage"):
                    res.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice["delta"].get("content") and not text:
                        text, res.ttft_s = True, time.perf_counter() - t0
                    if choice.get("finish_reason"):
                        res.status = "ok"
    except (TimeoutError, httpx.TimeoutException):
        res.status, res.detail = "hung", f"no end within {CLIENT_TIMEOUT_S:.0f} s"
    except Exception as e:
        res.detail = f"{type(e).__name__}: {e}"
    finally:
        res.latency_s = time.perf_counter() - t0
    return res


async def run_trace(
    url: str,
    model: str,
    trace: list[dict[str, Any]],
    policy: str,
    concurrency: int,
    on_done: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[list[Result], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    done = 0

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:

        async def guarded(i: int, item: dict[str, Any]) -> Result:
            nonlocal done
            async with sem:
                try:
                    r = await asyncio.wait_for(one(client, url, model, i, item, policy), CLIENT_TIMEOUT_S)
                except TimeoutError:
                    r = Result(i, "hung", detail=f"no end within {CLIENT_TIMEOUT_S:.0f} s")
            done += 1
            if on_done is not None:
                await on_done(done)
            return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(i, item) for i, item in enumerate(trace)))
        return list(results), time.perf_counter() - t0


def summary(results: list[Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == "ok"]
    tokens = sum(r.completion_tokens for r in ok)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "error_event", "lost", "hung")}
    devices: dict[str, int] = {}
    for r in ok:
        devices[r.device_id] = devices.get(r.device_id, 0) + 1
    return {
        **counts,
        "requests": len(results),
        "wall_s": round(wall_s, 2),
        "completion_tokens": tokens,
        "throughput_tok_s": round(tokens / wall_s, 2) if wall_s else None,
        "latency_p50_s": round(percentile([r.latency_s for r in ok], 50), 3),
        "latency_p95_s": round(percentile([r.latency_s for r in ok], 95), 3),
        "ttft_p50_s": round(percentile([r.ttft_s for r in ok if r.ttft_s is not None], 50), 3),
        "served_by": devices,
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from plugin.cluster.app import ClusterConfig, deploy
    from plugin.models.resolve import resolve_model

    resolve_model(args.model)  # converts once, here, before the replicas look for it
    trace = make_trace(args.requests, args.seed, (8, 16) if args.quick else (16, 48))
    home = Path(os.environ.get("ACCELSERVE_HOME") or Path.home() / ".cache" / "accelserve")
    nodes = TwoNodeCluster(home)
    result: dict[str, Any] = {
        "benchmark": "cluster",
        "labels": "simulated devices: both execute on the CPU provider, each node pinned to its own core",
        "nodes": [{"core": c, "simulate": s, "resources": r} for c, s, r in NODES],
        "model": str(args.model),
        "trace": {"requests": len(trace), "seed": args.seed, "concurrency": args.concurrency, "temperature": 0},
        "machine": machine_info(),
        "ray": ray.__version__,
        "runs": {},
    }
    try:
        address = nodes.start()
        ray.init(address=address, logging_level="warning", log_to_driver=False)
        nodes.wait_for_resources()
        port = free_port()
        t0 = time.perf_counter()
        deploy(ClusterConfig(model=str(args.model), cpu_backend="auto"), port=port)
        result["deploy_s"] = round(time.perf_counter() - t0, 1)
        url = f"http://127.0.0.1:{port}"
        log.info("deployed in %.0f s; warming up", result["deploy_s"])
        for policy in ("gpu", "npu"):
            asyncio.run(run_trace(url, str(args.model), trace[:2], policy, 2))
        plan = (
            ("one_replica_sim_gpu", "gpu"),
            ("one_replica_sim_npu", "npu"),
            ("two_replicas", "auto"),
            ("two_replicas_latency", "latency"),
        )
        for name, policy in plan:
            log.info("run %s (policy %s)", name, policy)
            results, wall = asyncio.run(run_trace(url, str(args.model), trace, policy, args.concurrency))
            result["runs"][name] = {"policy": policy, **summary(results, wall)}
            log.info("%s: %s", name, result["runs"][name])
        runs = result["runs"]
        alone = runs["one_replica_sim_gpu"]["throughput_tok_s"] + runs["one_replica_sim_npu"]["throughput_tok_s"]
        result["scaling_efficiency"] = round(runs["two_replicas"]["throughput_tok_s"] / alone, 3) if alone else None

        killed: dict[str, Any] = {}
        board = serve.get_deployment_handle("LoadBoard", app_name="accelserve")

        async def maybe_kill(done: int) -> None:
            if killed or done < max(1, len(trace) // 3):
                return
            killed["at_done"] = done
            reports = await board.snapshot.remote()
            victim = max(reports, key=lambda r: r.active + r.waiting)  # the busiest: most likely mid-stream
            killed.update(device=f"{victim.device['id']}@{victim.node}", active=victim.active, waiting=victim.waiting)
            actor = await asyncio.to_thread(ray.get_actor, victim.actor_name, "serve")
            await asyncio.to_thread(ray.kill, actor)  # no_restart=False: Serve starts a new replica
            log.info("killed %s", killed)

        log.info("run with a replica killed mid-run")
        results, wall = asyncio.run(run_trace(url, str(args.model), trace, "auto", args.concurrency, maybe_kill))
        result["runs"]["two_replicas_one_killed"] = {"policy": "auto", "killed": killed, **summary(results, wall)}
        result["runs"]["two_replicas_one_killed"]["not_ok"] = [asdict(r) for r in results if r.status != "ok"]
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        nodes.stop()
    result["load_average_at_end"] = list(os.getloadavg())
    result["busy_warning"] = busy_note()
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['labels']}")
    header = (
        f"{'run':26} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'ok':>4} {'err-ev':>6} {'lost':>4} {'hung':>4}  served by"
    )
    print(header)
    for name, r in result["runs"].items():
        print(
            f"{name:26} {r['throughput_tok_s']:>7} {r['latency_p50_s']:>7} {r['latency_p95_s']:>7} {r['ok']:>4} "
            f"{r['error_event']:>6} {r['lost']:>4} {r['hung']:>4}  {r['served_by']}"
        )
    print(f"scaling efficiency (two / (gpu alone + npu alone)): {result.get('scaling_efficiency')}")
    if "two_replicas_one_killed" in result["runs"]:
        print(f"killed: {result['runs']['two_replicas_one_killed']['killed']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 requests of 8-16 tokens")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cluster.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 8)
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to give each Ray node its own core")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    result = benchmark(args)
    print_table(result)
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
