"""`accelserve` command line: devices, prepare, export, models, finetune, generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

from plugin.engine.explain import placement_text
from plugin.engine.scheduler import POLICIES
from plugin.serve.limits import ServerLimits
from plugin.serve.malloc_arenas import cap_malloc_arenas

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("accelserve")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user: printed without a traceback."""
    from backends.base import BackendError
    from plugin.convert import ExportError
    from plugin.engine.devices import DeviceSpecError
    from plugin.engine.engine import EngineError
    from plugin.engine.scheduler import PlacementError
    from plugin.models.resolve import ModelSourceError

    return (ModelSourceError, ExportError, EngineError, BackendError, PlacementError, DeviceSpecError, ValueError)


# ---- subcommands ------------------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace) -> int:
    from plugin.engine.devices import devices_to_json, discover_devices, format_devices_table

    devices = discover_devices()
    if args.json:
        print(json.dumps(devices_to_json(devices), indent=2))
    else:
        console.print(format_devices_table(devices))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Resolve (convert) a model and load the backend a short chat would use, exporting it if needed."""
    from plugin.engine.engine import Engine

    with Engine.from_pretrained(args.model, policy=args.policy) as engine:
        model = engine.model
        console.print(f"model ready: {model.ref} -> {model.path} ({model.profile.size_label} params)")
        placement = engine.preload()
        console.print(
            f"backend ready: {placement.device_id} {placement.backend} {placement.precision} via {placement.provider}"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from plugin.convert import export

    exported = export(
        args.model,
        target=args.target,
        precision=args.precision,
        output=args.output,
        force=args.force,
        block_size=args.block_size,
        symmetric=not args.asymmetric,
        parity=not args.no_parity,
        graph=args.graph,
        context_length=args.context_length,
        window=args.window,
        memory=args.memory,
    )
    if args.json:
        print(json.dumps({"path": str(exported.path), "cache_hit": exported.cache_hit, **exported.manifest}, indent=2))
        return 0
    parity = exported.manifest.get("parity") or {}
    console.print(
        f"[green]{'cache hit' if exported.cache_hit else 'exported'}[/] {exported.target}/{exported.precision} "
        f"-> {exported.path}"
    )
    if parity:
        console.print(f"parity: {json.dumps(parity)}")
    return 0


def _sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    sampling: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    if args.seed is not None:
        sampling["seed"] = args.seed
    if args.stop:
        sampling["stop"] = tuple(args.stop)
    return sampling


def cmd_generate(args: argparse.Namespace) -> int:
    from plugin.engine.engine import Engine

    policy = args.device if args.device != "auto" else args.policy
    messages = [{"role": "user", "content": args.prompt}]
    with Engine.from_pretrained(args.model, policy=policy) as engine:
        if args.json:
            reply = engine.chat(messages, **_sampling_from(args))
            print(json.dumps(reply_to_json(reply), indent=2))
            return 0
        last = None
        for chunk in engine.chat(messages, stream=True, **_sampling_from(args)):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
        sys.stdout.write("\n")
        if last is not None and last.metrics is not None:
            p, m = last.placement, last.metrics
            err_console.print(f"[dim]{placement_text(p, m)}[/]")
            if last.finish_reason == "error":
                err_console.print(f"[red]error:[/] {last.error}")
                return 1
    return 0


def reply_to_json(reply: Any) -> dict[str, Any]:
    from plugin.engine.explain import placement_dict

    return {
        "text": reply.text,
        "finish_reason": reply.finish_reason,
        "placement": placement_dict(reply.placement),
        "metrics": reply.metrics.to_dict(),
    }


def cmd_chat(args: argparse.Namespace) -> int:
    from demos.chat import launch

    launch(
        model_ref=args.model or ["default"],
        host=args.host,
        port=args.port,
        policy=args.policy,
        share=False,
        auth=args.auth,
        allow_insecure=args.insecure_no_auth,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from plugin.serve.server import serve

    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_prompt_chars=args.max_prompt_chars,
        max_tokens=args.max_tokens,
        max_queue=args.max_queue,
        max_streams_per_client=args.max_streams_per_client,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        cors_origins=tuple(args.cors_origin or ()),
    )
    if args.ray is not None:  # Ray is imported only on this path (an optional extra)
        from plugin.cluster.cli import serve_on_ray

        return serve_on_ray(args, limits)
    serve(
        models=args.model or ["default"],
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        allow_insecure=args.insecure_no_api_key,
        policy=args.policy,
        limits=limits,
        isolate_backends=args.isolate_backends,
        cpu_backend=args.cpu_backend,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = {"backends": "bench_backends", "scheduler": "bench_scheduler"}[args.what]
    if importlib.util.find_spec("benchmarks") is None:
        raise SystemExit(
            "accelserve bench runs the scripts in benchmarks/, which ship with the source tree, not the wheel; "
            f"run it from a checkout: python benchmarks/{script}.py"
        )
    sys.argv = [script, *args.rest]
    runpy.run_module(f"benchmarks.{script}", run_name="__main__")
    return 0


# ---- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accelserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("devices", help="list GPUs, NPUs and the CPU (and simulated devices)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("prepare", help="convert a model and load (export) the backend a chat would use")
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--policy", choices=POLICIES, default="auto")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("export", help="Optimum ONNX export + quantization for onnxruntime-genai")
    p.add_argument("model")
    p.add_argument("--target", choices=("npu", "cpu", "gpu"), default="npu")
    p.add_argument("--precision", choices=("int4", "int8", "fp16", "fp32"), default="int4")
    p.add_argument("--output", help="also place the exported folder here (copy or link of the cache entry)")
    p.add_argument("--force", action="store_true", help="re-export even when the cache has it")
    p.add_argument("--block-size", type=int, default=32, help="int4/int8 quantization block size")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric (zero-point) quantization")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check against torch")
    p.add_argument(
        "--graph",
        choices=("auto", "fused", "plain", "qnn"),
        default="auto",
        help="fused ORT contrib-op graph (fast), the plain Optimum graph, or the QNN HTP pipeline; "
        "auto = qnn for --target npu, fused where supported otherwise",
    )
    p.add_argument(
        "--context-length", type=int, help="npu: tokens of the static KV buffer (default 1024; part of the cache key)"
    )
    p.add_argument("--window", type=int, help="npu: static prefill window of the context graph (default 64)")
    p.add_argument(
        "--memory",
        choices=("fast", "lean"),
        default="fast",
        help="fused int4 graph: fast = int8 compute everywhere (default); lean = fp32-compute MLP, "
        "~10 MB less resident memory for ~20%% slower decode (docs/fused-export.md)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="one chat turn, printed (streamed) to stdout")
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--device", choices=("auto", "gpu", "npu", "cpu"), default="auto", help="pin a device kind")
    p.add_argument("--policy", choices=POLICIES, default="auto")
    p.add_argument("--json", action="store_true", help="print text, placement and metrics as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="the Gradio chat page")
    p.add_argument("--model", action="append", help="model to load (repeatable: the page switches); default: default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--policy", choices=POLICIES, default="auto")
    p.add_argument("--auth", help="require this login, USER:PASSWORD (or set ACCELSERVE_CHAT_AUTH)")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback bind without a login")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--model", action="append", help="model reference to serve (repeatable); default: default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer <key>'")
    p.add_argument("--insecure-no-api-key", action="store_true", help="allow a non-loopback bind without a key")
    p.add_argument("--policy", choices=POLICIES, default="auto")
    p.add_argument("--cpu-backend", default="auto", help="the runtime for the CPU: auto, onnxruntime-genai or torch")
    p.add_argument(
        "--isolate-backends",
        action="store_true",
        help="run each backend in its own process: a crash in a native runtime fails only its requests",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="deploy as a Ray Serve application on the cluster at ADDRESS (e.g. HEAD:6379, or 'auto'), or on a "
        "local one when no address is given; needs `pip install accelserve[ray]` (docs/cluster.md)",
    )
    d = ServerLimits  # the defaults
    g = p.add_argument_group("limits (each refusal is counted in /metrics as accelserve_rejected_requests)")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="413 above it (default 4)")
    g.add_argument("--max-prompt-chars", type=int, help="413 above it (default: 32 per token of the context)")
    g.add_argument("--max-tokens", type=int, help="400 above it (default: the model's context)")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests per backend; 429 beyond")
    g.add_argument(
        "--max-streams-per-client",
        type=int,
        default=d.max_streams_per_client,
        help="concurrent generations per client address; 429 beyond; 0: no limit",
    )
    g.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds; 504 past it")
    g.add_argument(
        "--drain-timeout", type=float, default=d.drain_timeout_s, help="seconds running streams get on SIGTERM"
    )
    g.add_argument("--cors-origin", action="append", help="allow this browser origin (repeatable; '*': any)")
    p.set_defaults(func=cmd_serve)

    from plugin.finetune.cli import add_parser as add_finetune_parser
    from plugin.serve.models_cli import add_parser as add_models_parser

    add_finetune_parser(sub)
    add_models_parser(sub)

    p = sub.add_parser("bench", help="benchmarks (see benchmarks/)")
    p.add_argument("what", choices=("backends", "scheduler"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)], force=True
    )
    for noisy in ("httpx", "urllib3", "filelock", "torch", "transformers", "optimum"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if args.func in (cmd_serve, cmd_chat, cmd_generate):  # serving processes; training and export keep glibc's
        cap_malloc_arenas()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except _user_errors() as e:
        err_console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
