"""Serving numbers from guidellm (vLLM's serving benchmark) against a live accelserve server.

    python benchmarks/bench_serving.py --device cpu --backend onnxruntime-genai   # the CPU int4 export
    python benchmarks/bench_serving.py --device cpu --backend torch               # the torch path
    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --model default  # a server already running
    make bench-serving                                                            # both CPU paths, default model

The engine-level benchmarks (bench_backends.py) time our backends from Python; this one measures what an
HTTP client sees, with the tool vLLM users already trust, so the two can be read side by side.

How it runs:
- guidellm lives in its own virtualenv (`.venv-guidellm`, created on first use from the exact pins in
  benchmarks/guidellm-requirements.txt, never in the project's .venv: its unpinned requirements would
  replace our torch and transformers). Set ACCELSERVE_GUIDELLM_VENV or --guidellm-venv to put it elsewhere.
- Without --url the script starts a server on a free loopback port: the app `accelserve serve` serves
  (plugin.serve.server.create_app), on an Engine pinned to --device and, on the CPU, to --backend (the
  CLI has no runtime pin: its `auto` CPU choice is onnxruntime-genai int4 for a small model). It sends one
  warm-up request, then runs guidellm, then stops the server.
- guidellm: `concurrent` profile at each --streams count, synthetic prompts of --prompt-tokens tokens with
  exactly --output-tokens generated (it sends vLLM's `ignore_eos`), streamed chat completions, the
  model's own tokenizer from its local folder (nothing from a hub), --requests-per-stream x streams
  requests per count (at least --min-requests), each count capped at --max-seconds.
- Reported per stream count from guidellm's own JSON report: TTFT and inter-token latency (median, p95),
  time per output token, request latency, output tokens/s (guidellm's server throughput: its mean over
  the run, with the median and p95 of that rate), successful / errored / incomplete requests.
Writes benchmarks/results/serving_<device>_<backend>_<precision>.json (and RESULTS.md when it writes
there). guidellm runs on the same cores as the server: on a small machine its client work competes with
the model, which the JSON records beside the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, ROOT, busy_note, machine_info, write_json

log = logging.getLogger("bench_serving")

GUIDELLM_VERSION = "0.8.1"
GUIDELLM_LOCK = Path(__file__).resolve().with_name("guidellm-requirements.txt")
GUIDELLM_VENV = ROOT / ".venv-guidellm"
VENV_ENV = "ACCELSERVE_GUIDELLM_VENV"
STAMP = ".accelserve-installed.json"
# guidellm must never reach a hub: the tokenizer is a local folder and the prompts are synthetic.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---- guidellm's own virtualenv ----------------------------------------------------------------------------


def _lock_digest(lock: Path) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def _tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def guidellm_env(venv: Path | None = None, lock: Path = GUIDELLM_LOCK, python: str = sys.executable) -> dict[str, Any]:
    """Create guidellm's virtualenv once from the pinned lock (again when the lock changes); describe it.

    Separate from the project's .venv because guidellm's own requirements would replace our torch and
    transformers. The install is guarded by a file lock so that two runs never build it at once. Returns
    the executable, the venv, and how long the install took and how much disk it uses (from when it was
    built).
    """
    from filelock import FileLock

    venv = Path(venv or os.environ.get(VENV_ENV) or GUIDELLM_VENV).resolve()
    exe = venv / "bin" / "guidellm"
    stamp = venv / STAMP
    digest = _lock_digest(lock)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv.with_name(f"{venv.name}.lock"))):
        if stamp.is_file() and exe.is_file():
            info = json.loads(stamp.read_text())
            if info.get("lock_sha256") == digest:
                return {**info, "exe": str(exe), "venv": str(venv), "built_now": False}
            log.info("guidellm's pins changed: rebuilding %s", venv)
        if venv.exists():
            shutil.rmtree(venv)
        t0 = time.perf_counter()
        log.info("creating guidellm's virtualenv %s from %s (about a minute, ~1.5 GB: torch is half)", venv, lock.name)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        done = subprocess.run([*pip, "-r", str(lock)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"installing guidellm's pins failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        info = {
            "guidellm": GUIDELLM_VERSION,
            "lock_sha256": digest,
            "install_s": round(time.perf_counter() - t0, 1),
            "disk_bytes": _tree_bytes(venv),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        stamp.write_text(json.dumps(info, indent=2) + "\n")
        log.info("guidellm ready in %.0f s, %.2f GB on disk", info["install_s"], info["disk_bytes"] / 1e9)
        return {**info, "exe": str(exe), "venv": str(venv), "built_now": True}


# ---- the server -------------------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on the loopback interface (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_worker(spec: dict[str, Any]) -> None:
    """The server process: one Engine pinned as asked, served by the app `accelserve serve` serves."""
    import uvicorn

    from plugin.engine.devices import discover_devices
    from plugin.engine.engine import Engine
    from plugin.models.resolve import resolve_model
    from plugin.serve.server import create_app

    devices = discover_devices()
    if spec["backend"] != "auto":  # keep only the named runtime on every device
        devices = [
            dataclasses.replace(d, backends=tuple(b for b in d.backends if b == spec["backend"])) for d in devices
        ]
    policy = spec["device"] if spec["device"] != "auto" else "auto"
    engine = Engine(resolve_model(spec["model"]), policy=policy, devices=devices)
    try:
        placement = engine.preload()
        log.warning(
            "serving %s on %s via %s %s", spec["model"], placement.device_id, placement.backend, placement.provider
        )
        app = create_app({spec["name"]: engine})
        uvicorn.run(app, host="127.0.0.1", port=spec["port"], log_level="warning")
    finally:
        engine.close()


@contextlib.contextmanager
def running_server(model: str, device: str, backend: str, log_path: Path, timeout_s: float = 900.0) -> Iterator[str]:
    """Start a server on a free loopback port, yield its base URL once it answers, stop it afterwards."""
    port = free_port()
    spec = {"model": model, "name": model, "device": device, "backend": backend, "port": port}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-worker", json.dumps(spec)]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{_tail(log_path)}")
            if _healthy(url):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):  # not listening yet, or 503 while no device is healthy
        return False


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def warm_up(url: str, model: str, api_key: str | None = None) -> dict[str, Any]:
    """One short chat completion, so the first measured request does not pay for warm-up; returns its placement."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **({"authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    placement = dict(reply.get("accelserve") or {})
    placement.pop("metrics", None)
    placement.pop("reason", None)
    return placement


def server_capacity(url: str, device_id: str | None) -> int | None:
    """How many generations the server runs at once on the backend that served the warm-up (from /health).

    Requests beyond it wait in the server's line, and their TTFT includes the wait: the number explains the
    TTFT at high stream counts.
    """
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            report = json.loads(r.read())
    except (OSError, urllib.error.URLError, ValueError) as e:
        log.warning("could not read %s/health: %s", url, e)
        return None
    for model in (report.get("models") or {}).values():
        for device in model.get("devices") or []:
            if device.get("device_id") == device_id:
                for loaded in device.get("loaded") or []:
                    if loaded.get("capacity"):
                        return int(loaded["capacity"])
    return None


# ---- guidellm ---------------------------------------------------------------------------------------------


def request_counts(streams: Sequence[int], per_stream: int, minimum: int) -> list[int]:
    """Requests per stream count: enough for every stream to send several, and never fewer than `minimum`."""
    return [max(minimum, per_stream * s) for s in streams]


def scenario(
    url: str,
    model: str,
    tokenizer: str,
    streams: Sequence[int],
    counts: Sequence[int],
    prompt_tokens: int,
    output_tokens: int,
    max_seconds: float,
    report: Path,
    api_key: str | None = None,
) -> dict[str, Any]:
    """guidellm's scenario file (what its `run --scenario` reads): one benchmark per stream count."""
    backend: dict[str, Any] = {"kind": "openai_http", "target": url, "model": model}
    if api_key:
        backend["api_key"] = api_key
    return {
        "spec": {
            "backend": backend,
            "profile": {"kind": "concurrent", "streams": list(streams)},
            "constraints": [
                {"kind": "max_requests", "count": list(counts)},
                {"kind": "max_duration", "seconds": max_seconds},
            ],
            "tokenizer": {"kind": "huggingface_auto", "model": tokenizer},
            "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}],
            "outputs": [{"kind": "json", "path": str(report)}],
            "metrics": {"kind": "generative", "sample_size": 0},  # statistics for every request, no texts
        }
    }


def run_guidellm(exe: str, scen: dict[str, Any], workdir: Path, log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run guidellm on the scenario; return its JSON report (its console output goes to `log_path`)."""
    scen_path = workdir / "scenario.json"
    scen_path.write_text(json.dumps(scen, indent=2))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OFFLINE_ENV)
    env.setdefault("COLUMNS", "200")
    cmd = [exe, "run", "--scenario", str(scen_path), "--disable-console-interactive"]
    with open(log_path, "w") as out:
        done = subprocess.run(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout_s
        )
    report = Path(scen["spec"]["outputs"][0]["path"])
    if done.returncode != 0 or not report.is_file():
        raise RuntimeError(f"guidellm failed (exit {done.returncode}):\n{_tail(log_path)}")
    return json.loads(report.read_text())


def _dist(metrics: dict[str, Any], name: str) -> dict[str, float | None]:
    s = (metrics.get(name) or {}).get("successful") or {}
    if not s.get("count"):
        return {"median": None, "p95": None, "mean": None}
    return {"median": s["median"], "p95": s["percentiles"]["p95"], "mean": s["mean"]}


def summarize_report(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark (stream count) from guidellm's JSON report: the numbers this project publishes."""
    rows = []
    for bench in report["benchmarks"]:
        m = bench["metrics"]
        strategy = bench["config"]["strategy"]
        out_tokens = (m.get("output_token_count") or {}).get("successful") or {}
        rows.append(
            {
                "streams": strategy.get("streams"),
                "requests": dict(m["request_totals"]),
                "duration_s": bench["duration"],
                "prompt_tokens": _dist(m, "prompt_token_count")["median"],
                "output_tokens_total": out_tokens.get("total_sum", 0),
                "ttft_ms": _dist(m, "time_to_first_token_ms"),
                "itl_ms": _dist(m, "inter_token_latency_ms"),
                "tpot_ms": _dist(m, "time_per_output_token_ms"),
                "latency_s": _dist(m, "request_latency"),
                "output_tps": _dist(m, "output_tokens_per_second"),
                "requests_per_s": _dist(m, "requests_per_second")["mean"],
            }
        )
    return rows


def _resolve_tokenizer(model: str) -> str:
    """The model's local folder (its tokenizer files), through the project: nothing is fetched from a hub."""
    from plugin.models.resolve import resolve_model

    return str(resolve_model(model).path)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Start (or use) the server, warm it up, run guidellm at every stream count, summarize."""
    env = guidellm_env(args.guidellm_venv)
    tokenizer = args.tokenizer or _resolve_tokenizer(args.model)
    counts = request_counts(args.streams, args.requests_per_stream, args.min_requests)
    machine = machine_info()
    busy_start = busy_note()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        server = (
            contextlib.nullcontext(args.url.rstrip("/").removesuffix("/v1"))
            if args.url
            else running_server(args.model, args.device, args.backend, work / "server.log")
        )
        with server as url:
            placement = warm_up(url, args.model, args.api_key)
            capacity = server_capacity(url, placement.get("device_id"))
            scen = scenario(
                url,
                args.model,
                tokenizer,
                args.streams,
                counts,
                args.prompt_tokens,
                args.output_tokens,
                args.max_seconds,
                work / "guidellm.json",
                args.api_key,
            )
            timeout = args.max_seconds * len(args.streams) + 600
            t0 = time.perf_counter()
            report = run_guidellm(env["exe"], scen, work, work / "guidellm.log", timeout)
            wall = time.perf_counter() - t0
            if args.guidellm_report:
                shutil.copyfile(work / "guidellm.json", args.guidellm_report)
    scen["spec"]["outputs"][0]["path"] = "(temporary)"  # no local paths in the committed results
    scen["spec"]["tokenizer"]["model"] = "(the model's own folder)" if not args.tokenizer else args.tokenizer
    scen["spec"]["backend"].pop("api_key", None)
    return {
        "benchmark": "serving",
        "tool": {
            "name": "guidellm",
            "version": report.get("metadata", {}).get("guidellm_version", GUIDELLM_VERSION),
            "scenario": scen,
            "command": "guidellm run --scenario scenario.json --disable-console-interactive",
        },
        "model": {"ref": args.model},
        "server": {
            "started_by_benchmark": not args.url,
            "device": args.device,
            "backend": args.backend,
            "placement": placement,
            "concurrent_generations": capacity,
        },
        "settings": {
            "streams": args.streams,
            "requests": dict(zip(map(str, args.streams), counts, strict=True)),
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "max_seconds_per_count": args.max_seconds,
            "client": "guidellm on the same machine as the server (it shares the cores)",
        },
        "rows": summarize_report(report),
        "guidellm_env": {k: env[k] for k in ("guidellm", "install_s", "disk_bytes", "built_at", "built_now")},
        "machine": machine,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "busy_warning": busy_start or busy_note(),
        "wall_s": round(wall, 1),
    }


def label(result: dict[str, Any]) -> str:
    """'cpu_onnxruntime-genai_int4': device kind, backend and precision as they really ran."""
    p = result["server"]["placement"]
    parts = [p.get("device") or result["server"]["device"], p.get("backend") or "?", p.get("precision") or "?"]
    return "_".join(str(x).replace("/", "-") for x in parts)


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    p = result["server"]["placement"]
    s = result["settings"]
    title = (
        f"guidellm {result['tool']['version']} -> {result['model']['ref']} on {p.get('device_id')} "
        f"{p.get('backend')} {p.get('precision')} ({p.get('provider')}); prompt {s['prompt_tokens']} tokens, "
        f"{s['output_tokens']} generated"
    )
    table = Table(title=title)
    for col in (
        "streams",
        "ok / err",
        "TTFT ms p50",
        "p95",
        "ITL ms p50",
        "p95",
        "TPOT ms p50",
        "latency s p50",
        "p95",
        "output tok/s",
        "p50",
        "p95",
    ):
        table.add_column(col, justify="right")

    def f(x: float | None, digits: int = 1) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for r in result["rows"]:
        req = r["requests"]
        table.add_row(
            str(r["streams"]),
            f"{req['successful']} / {req['errored'] + req['incomplete']}",
            f(r["ttft_ms"]["median"], 0),
            f(r["ttft_ms"]["p95"], 0),
            f(r["itl_ms"]["median"]),
            f(r["itl_ms"]["p95"]),
            f(r["tpot_ms"]["median"]),
            f(r["latency_s"]["median"], 2),
            f(r["latency_s"]["p95"], 2),
            f(r["output_tps"]["mean"]),
            f(r["output_tps"]["median"]),
            f(r["output_tps"]["p95"]),
        )
    console.print(table)
    console.print(
        "output tok/s: guidellm's server throughput (its mean over the run), then the median and p95 of that rate"
    )


# ---- command line -----------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = sorted({int(x) for x in text.split(",") if x.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"need a comma list of counts >= 1, like 1,4,8,16 (got {text!r})")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model reference to serve (and its served name)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu", "npu"),
        default="auto",
        help="device to pin (default auto: the scheduler's choice)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "onnxruntime-genai", "torch"),
        default="auto",
        help="runtime to pin (auto: the scheduler's choice, onnxruntime-genai int4 for a small model on the CPU)",
    )
    p.add_argument("--url", help="benchmark a server already running at this base URL instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("ACCELSERVE_API_KEY"), help="bearer key of --url's server")
    p.add_argument("--tokenizer", help="local tokenizer folder for guidellm (default: the --model's own folder)")
    p.add_argument("--streams", type=_int_list, default=[1, 4, 8, 16], help="concurrent streams (default 1,4,8,16)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="synthetic prompt length in tokens (default 128)")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--requests-per-stream", type=int, default=3, help="requests per stream at each count (default 3)")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per count (default 8)")
    p.add_argument("--max-seconds", type=float, default=180.0, help="cap per stream count (default 180)")
    p.add_argument("--guidellm-venv", type=Path, help=f"guidellm's virtualenv (default ${VENV_ENV} or .venv-guidellm)")
    p.add_argument("--guidellm-report", type=Path, help="also keep guidellm's own JSON report here")
    p.add_argument("--out", type=Path, help="JSON path (default results/serving_<device>_<backend>_<precision>.json)")
    p.add_argument("--setup-only", action="store_true", help="create guidellm's virtualenv and exit")
    p.add_argument("--serve-worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.serve_worker else logging.INFO, format="%(name)s: %(message)s")
    if args.serve_worker:
        _serve_worker(json.loads(args.serve_worker))
        return 0
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    if args.setup_only:
        env = guidellm_env(args.guidellm_venv)
        console.print(
            f"guidellm {env['guidellm']} in {env['venv']}: installed in {env['install_s']} s, "
            f"{env['disk_bytes'] / 1e9:.2f} GB on disk"
        )
        return 0
    for name in ("prompt_tokens", "output_tokens", "requests_per_stream", "min_requests"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    note = busy_note()
    if note:
        console.print(f"[yellow]warning:[/] {note}")
    result = benchmark(args)
    print_table(result, console)
    if result["busy_warning"]:
        console.print(f"[yellow]warning:[/] {result['busy_warning']}")
    out = write_json(args.out or RESULTS_DIR / f"serving_{label(result)}.json", result)
    console.print(f"wrote {out}")
    if out.parent.resolve() == RESULTS_DIR.resolve():  # the committed results: keep RESULTS.md in step
        from benchmarks.report import write_results_md

        console.print(f"wrote {write_results_md()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
