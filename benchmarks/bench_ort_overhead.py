"""Overhead of OrtGenaiBackend over a bare onnxruntime-genai generate loop, plus its concurrency throughput.

    python benchmarks/bench_ort_overhead.py                       # the default model, npu/int4 export
    python benchmarks/bench_ort_overhead.py --model tiny          # a tiny random llama (seconds, for a smoke run)
    python benchmarks/bench_ort_overhead.py --model path/to/export_or_hf_folder --compare-engine

Overhead: the same og.Model, the same prompt ids, greedy decoding; the bare loop is the standard
onnxruntime-genai streaming loop (generate_next_token, get_next_tokens, TokenizerStream.decode) and
"ours" is `OrtGenaiBackend.generate`. Runs alternate bare/ours in one process; decode tokens/s is
(tokens - 1) / (time of last token - time of first token). The table reports medians; the overhead is
given both as the ratio of medians and as the median of per-pair ratios (robust to background load).

Concurrency: aggregate decode throughput (all tokens / wall time) of 1 and 4 simultaneous streams
through the backend; with --compare-engine also og.Engine on the same model, and whether each of its
streams equals that prompt's sequential greedy output (the reason the backend does not use it).
Writes benchmarks/results/ort_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.base import GenerationRequest, SamplingParams  # noqa: E402
from backends.ort_genai.backend import OrtGenaiBackend  # noqa: E402

log = logging.getLogger("bench_ort_overhead")

CONCURRENT_PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain how airplanes fly.",
    "List ten fruits and describe each one.",
    "What is the capital of France? Answer and then describe the city.",
]


def resolve_model(model: str, target: str, precision: str) -> Path:
    """An onnxruntime-genai folder: given directly, or exported (through the cache) from a model reference."""
    folder = Path(model)
    if (folder / "genai_config.json").is_file():
        return folder
    from plugin.convert import export

    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_model

        tmp = Path(tempfile.mkdtemp(prefix="bench-ort-"))
        source = build_tiny_model(tmp / "tiny-llama", "llama")
        return export(str(source), target="cpu", precision="fp32", home=tmp / "home").path
    return export(model, target=target, precision=precision).path


def chat(text: str, max_new: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": text}], sampling=SamplingParams(max_new_tokens=max_new)
    )


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 and stamps[-1] > stamps[0] else 0.0


def bare_loop(backend: OrtGenaiBackend, ids: list[int], max_new: int) -> tuple[float, list[int]]:
    """The plain onnxruntime-genai streaming loop on the backend's own model (a batched backend keeps none:
    an og.Model of the same folder and threads is loaded once for the loop)."""
    import onnxruntime_genai as og

    model = backend._model
    if model is None:
        from backends.ort_genai.providers import PROVIDERS, build_config

        model = getattr(backend, "_bare_model", None)
        if model is None:
            model = og.Model(build_config(backend.model_dir, PROVIDERS["cpu"], backend.num_threads))
            backend._bare_model = model  # type: ignore[attr-defined]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    stream = og.Tokenizer(model).create_stream()
    stamps: list[float] = []
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        token = generator.get_next_tokens()[0]
        stream.decode(token)
        stamps.append(time.perf_counter())
        tokens.append(int(token))
    return decode_rate(stamps), tokens


def ours(backend: OrtGenaiBackend, request: GenerationRequest) -> tuple[float, list[int]]:
    stamps: list[float] = []
    tokens: list[int] = []
    for chunk in backend.generate(request):
        if chunk.token_ids:
            stamps.append(time.perf_counter())
            tokens.extend(chunk.token_ids)
    return decode_rate(stamps), tokens


def aggregate(backend: OrtGenaiBackend, streams: int, max_new: int) -> float:
    """All generated tokens / wall time for `streams` simultaneous requests."""
    counts = [0] * streams

    def work(i: int) -> None:
        request = chat(CONCURRENT_PROMPTS[i % len(CONCURRENT_PROMPTS)], max_new)
        counts[i] = sum(len(c.token_ids) for c in backend.generate(request))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def engine_run(backend: OrtGenaiBackend, prompts: list[list[int]], max_new: int) -> tuple[float, list[list[int]], int]:
    """og.Engine with all prompts submitted at once: aggregate tokens/s, each request's tokens, failed requests."""
    import onnxruntime_genai as og

    engine = og.Engine(backend._model)
    buffer = engine.create_event_buffer(64)
    requests = []
    for ids in prompts:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(max_new)
        options.set_do_sample(False)
        request.begin_turn(ids, options)
        requests.append(request)
    outputs: list[list[int]] = [[] for _ in prompts]
    failed = 0
    start = time.perf_counter()
    while engine.has_pending_requests():
        for event in engine.run(buffer):
            i = next(k for k, r in enumerate(requests) if r is event.request)
            if event.flags.value & og.EngineEventFlags.TOKEN.value and int(event.token) not in backend._eos_ids:
                outputs[i].append(int(event.token))
            if event.flags.value & og.EngineEventFlags.FAILED.value:
                failed += 1
    elapsed = time.perf_counter() - start
    for request in requests:
        request.close()
    return sum(map(len, outputs)) / elapsed, outputs, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny', an HF folder/hub id, or an export")
    parser.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="int4", choices=["int4", "int8", "fp16", "fp32"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=11, help="alternating bare/ours pairs (medians reported)")
    parser.add_argument("--concurrency-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)")
    parser.add_argument("--compare-engine", action="store_true", help="also measure og.Engine at 1 and 4 streams")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "ort_overhead.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_new_tokens < 8:
        parser.error("--repeats must be >= 1 and --max-new-tokens >= 8")
    logging.basicConfig(level=logging.WARNING)

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    folder = resolve_model(args.model, args.target, args.precision)
    # One generator per request: the path this benchmark measures against the bare loop (and og.Engine).
    backend = OrtGenaiBackend(
        folder, device=args.target, simulated=args.target != "cpu", num_threads=args.threads, batching=False
    )
    backend.load()
    caps = backend.capabilities()
    request = chat(CONCURRENT_PROMPTS[0], args.max_new_tokens)
    ids = backend.encode(request)

    bare_rates, our_rates, n_tokens = [], [], 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bare vs backend", total=args.repeats + 1)
        bare_loop(backend, ids, args.max_new_tokens)  # warm-up, not counted
        ours(backend, request)
        progress.advance(task)
        for i in range(args.repeats):
            # Alternate which loop goes first, so neither always runs on the warmer (or noisier) side of a pair.
            first_bare = i % 2 == 0
            if not first_bare:
                our_rate, our_tokens = ours(backend, request)
            bare_rate, bare_tokens = bare_loop(backend, ids, args.max_new_tokens)
            if first_bare:
                our_rate, our_tokens = ours(backend, request)
            bare_rates.append(bare_rate)
            our_rates.append(our_rate)
            if our_tokens != bare_tokens:  # both count the EOS token
                raise SystemExit("the backend and the bare loop produced different tokens; the comparison is void")
            n_tokens = len(our_tokens)
            progress.advance(task)

        concurrency: dict[str, dict[str, Any]] = {"backend (per-request generators)": {}}
        conc_task = progress.add_task("concurrency", total=2 * args.concurrency_repeats)
        for streams in (1, 4):
            runs = []
            for _ in range(args.concurrency_repeats):
                runs.append(aggregate(backend, streams, args.max_new_tokens))
                progress.advance(conc_task)
            concurrency["backend (per-request generators)"][str(streams)] = statistics.median(runs)
        if args.compare_engine:
            prompt_ids = [backend.encode(chat(p, args.max_new_tokens)) for p in CONCURRENT_PROMPTS]
            sequential = [ours(backend, chat(p, args.max_new_tokens))[1] for p in CONCURRENT_PROMPTS]
            one = statistics.median(engine_run(backend, prompt_ids[:1], args.max_new_tokens)[0] for _ in range(2))
            four_rate, four_out, four_failed = engine_run(backend, prompt_ids, args.max_new_tokens)
            concurrency["og.Engine"] = {
                "1": one,
                "4": four_rate,
                "streams_equal_sequential_greedy": [a == b for a, b in zip(four_out, sequential, strict=True)],
                "failed_requests": four_failed,
            }

    bare_med, our_med = statistics.median(bare_rates), statistics.median(our_rates)
    overhead = (bare_med - our_med) / bare_med * 100 if bare_med else float("nan")
    # Each pair ran back to back under the same background load: the median of per-pair ratios is the
    # estimate least disturbed by load that changes between pairs.
    paired = statistics.median((b - o) / b * 100 for b, o in zip(bare_rates, our_rates, strict=True) if b > 0)
    table = Table(title=f"Decode tokens/s at batch 1 - {folder.name} on {caps.provider} ({caps.precision})")
    for col in ("loop", "median tok/s", "min", "max", "runs"):
        table.add_column(col)
    for name, rates in (("bare onnxruntime-genai", bare_rates), ("OrtGenaiBackend", our_rates)):
        table.add_row(
            name, f"{statistics.median(rates):.1f}", f"{min(rates):.1f}", f"{max(rates):.1f}", str(len(rates))
        )
    console.print(table)
    console.print(
        f"overhead: {overhead:+.2f}% (ratio of medians), {paired:+.2f}% (median of paired runs) of bare decode "
        f"tokens/s; {n_tokens} tokens per run; target < 3%"
    )
    conc_table = Table(title="Aggregate tokens/s (all streams / wall time, incl. prefill)")
    for col in ("strategy", "1 stream", "4 streams", "note"):
        conc_table.add_column(col)
    for name, row in concurrency.items():
        note = ""
        if "streams_equal_sequential_greedy" in row:
            note = (
                f"streams == sequential greedy: {row['streams_equal_sequential_greedy']}; "
                f"failed: {row['failed_requests']}"
            )
        conc_table.add_row(name, f"{row['1']:.1f}", f"{row['4']:.1f}", note)
    console.print(conc_table)

    result = {
        "model": str(args.model),
        "export": folder.name,
        "provider": caps.provider,
        "device": caps.device,
        "simulated": caps.simulated,
        "precision": caps.precision,
        "max_new_tokens": args.max_new_tokens,
        "tokens_per_run": n_tokens,
        "prompt_tokens": len(ids),
        "bare_tok_s": bare_rates,
        "backend_tok_s": our_rates,
        "bare_median": bare_med,
        "backend_median": our_med,
        "overhead_pct": overhead,
        "overhead_pct_paired_median": paired,
        "concurrency_aggregate_tok_s": concurrency,
        "threads": args.threads,
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
