"""Soak: many concurrent streaming clients for minutes, with random cancellations and disconnects.

Each client loops: a streamed chat read to the end, a stream dropped after a few chunks, a request dropped
before its first token, or a plain (non-streamed) request. The script reports requests served, outcomes
by status, p50/p95 latency per time window, the server's RSS at start and end, and hung streams (no byte
for `--hang-s`). After the run every slot and queue place must be free again.

    python benchmarks/soak_server.py --model default --clients 32 --minutes 10
    python benchmarks/soak_server.py --url http://127.0.0.1:8000 --clients 32 --minutes 10

The fast test suite runs `soak()` for a few seconds against a fake backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = (("full_stream", 0.55), ("drop_mid_stream", 0.2), ("drop_before_first", 0.1), ("non_streamed", 0.15))


@dataclass
class Outcome:
    t: float  # seconds since the start, when it ended
    action: str
    status: str  # HTTP status, "dropped" (by us, on purpose), "hung", or "error:<type>"
    latency_s: float
    ttft_s: float | None = None


@dataclass
class SoakReport:
    clients: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (t, bytes) of the server process

    def by_status(self) -> dict[str, int]:
        return dict(sorted(Counter(o.status for o in self.outcomes).items()))

    def hung(self) -> int:
        return sum(o.status == "hung" for o in self.outcomes)

    def windows(self, width_s: float) -> list[dict[str, Any]]:
        rows = []
        for start in range(0, int(self.seconds) + 1, int(width_s)):
            done = [o for o in self.outcomes if start <= o.t < start + width_s and o.status == "200"]
            lat = sorted(o.latency_s for o in done)
            rows.append(
                {
                    "window_s": f"{start}-{start + int(width_s)}",
                    "served": len(done),
                    "p50_s": _pct(lat, 0.5),
                    "p95_s": _pct(lat, 0.95),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "requests": len(self.outcomes),
            "by_status": self.by_status(),
            "hung": self.hung(),
            "rss_start_bytes": self.rss_samples[0][1] if self.rss_samples else None,
            "rss_end_bytes": self.rss_samples[-1][1] if self.rss_samples else None,
            "rss_samples": self.rss_samples,
            "windows": self.windows(max(self.seconds / 10, 1)),
            "outcomes": [asdict(o) for o in self.outcomes],
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


async def soak(
    url: str,
    model: str,
    clients: int,
    seconds: float,
    *,
    max_tokens: int = 32,
    hang_s: float = 120.0,
    seed: int = 0,
    rss: Callable[[], int | None] | None = None,
    headers: dict[str, str] | None = None,
) -> SoakReport:
    """Run `clients` looping clients against `url` for `seconds`; every request ends in an Outcome."""
    report = SoakReport(clients, seconds)
    t0 = time.monotonic()
    stop_at = t0 + seconds
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    timeout = httpx.Timeout(hang_s, connect=30)

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=headers) as http:
            n = 0
            while time.monotonic() < stop_at:
                action = rng.choices([a for a, _ in ACTIONS], [w for _, w in ACTIONS])[0]
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Client {i}, request {n}: tell me about the sea."}],
                    "max_tokens": max_tokens,
                    "temperature": 0.7,
                    "seed": rng.randrange(2**31),
                    "stream": action != "non_streamed",
                }
                report.outcomes.append(await _one(http, body, action, rng, t0))
                n += 1

    async def sample_rss() -> None:
        while time.monotonic() < stop_at:
            value = rss() if rss else None
            if value is not None:
                report.rss_samples.append((round(time.monotonic() - t0, 1), value))
            await asyncio.sleep(max(seconds / 20, 0.5))

    await asyncio.gather(sample_rss(), *(client(i) for i in range(clients)))
    if rss is not None and (value := rss()) is not None:
        report.rss_samples.append((round(time.monotonic() - t0, 1), value))
    return report


async def _one(http: httpx.AsyncClient, body: dict, action: str, rng: random.Random, t0: float) -> Outcome:
    start = time.monotonic()
    ttft = None

    def done(status: str) -> Outcome:
        now = time.monotonic()
        return Outcome(round(now - t0, 3), action, status, round(now - start, 4), ttft)

    try:
        if action == "non_streamed":
            r = await http.post("/v1/chat/completions", json=body)
            return done(str(r.status_code))
        if action == "drop_before_first":
            task = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            await asyncio.sleep(rng.uniform(0, 0.05))
            if task.done():
                return done(str(task.result().status_code))
            task.cancel()  # closes the connection before any byte of the reply
            await asyncio.gather(task, return_exceptions=True)
            return done("dropped")
        keep = rng.randint(1, 4) if action == "drop_mid_stream" else None
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return done(str(r.status_code))
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if ttft is None:
                    ttft = round(time.monotonic() - start, 4)
                if '"error"' in line:
                    return done("stream_error")
                chunks += 1
                if keep is not None and chunks >= keep:
                    return done("dropped")  # leaving the block closes the stream mid-way
                if line == "data: [DONE]":
                    return done("200")
            return done("stream_ended_without_done")
    except httpx.TimeoutException:
        return done("hung")
    except httpx.HTTPError as e:
        return done(f"error:{type(e).__name__}")


def _rss_of(pid: int) -> Callable[[], int | None]:
    def read() -> int | None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    return read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="soak a running server (otherwise `accelserve serve --model M` is started)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hang-s", type=float, default=120.0, help="a stream silent this long counts as hung")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak_server.json")
    args = parser.parse_args(argv)

    proc = None
    url = args.url
    name = args.model
    if url is None:
        port = _free_port()
        cmd = [str(Path(sys.executable).with_name("accelserve")), "serve", "--model", args.model, "--port", str(port)]
        cmd += ["--max-streams-per-client", "0"]  # every soak client shares one address
        log_path = args.out.with_suffix(".server.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 1800
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not come up; see {log_path}")
            time.sleep(1)
    try:
        rss = _rss_of(proc.pid) if proc is not None else None
        report = asyncio.run(
            soak(url, name, args.clients, args.minutes * 60, max_tokens=args.max_tokens, hang_s=args.hang_s, rss=rss)
        )
        status = httpx.get(f"{url}/health", timeout=30).json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)
    data = report.to_dict()
    busy = [(m, d["device_id"], d["active"], d["waiting"]) for m, v in status["models"].items() for d in v["devices"]]
    data["left_busy_after"] = [b for b in busy if b[2] or b[3]]
    print(f"{data['requests']} requests from {args.clients} clients in {args.minutes:g} min; by status:")
    print("  " + ", ".join(f"{k}: {v}" for k, v in data["by_status"].items()))
    print(f"hung streams: {data['hung']}; slots or queue places still taken after the run: {data['left_busy_after']}")
    if data["rss_start_bytes"]:
        print(f"server RSS: {data['rss_start_bytes'] / 2**20:.0f} MiB -> {data['rss_end_bytes'] / 2**20:.0f} MiB")
    print(f"{'window (s)':>12} {'served':>7} {'p50 (s)':>8} {'p95 (s)':>8}")
    for w in data["windows"]:
        print(f"{w['window_s']:>12} {w['served']:>7} {w['p50_s'] or '-':>8} {w['p95_s'] or '-':>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))
    print(f"wrote {args.out}")
    return 0 if data["hung"] == 0 and not data["left_busy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
