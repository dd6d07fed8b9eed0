"""Concurrent streams on the onnxruntime-genai CPU path: shared decode steps on the rows kernel vs onnxruntime's.

    python benchmarks/bench_ort_batching.py                    # the default model's int4 CPU export (the serving one)
    python benchmarks/bench_ort_batching.py --model tiny       # a tiny random llama (seconds, a smoke run)
    python benchmarks/bench_ort_batching.py --streams 1 4 8 16 --repeats 5 --max-new-tokens 64

For each stream count N, N chat requests (different prompts, so different lengths; greedy; EOS ignored so
every stream makes exactly --max-new-tokens tokens) run at once through:
- "batched":    OrtGenaiBackend(), continuous batching (backends/ort_genai/batching.py), the export's
                int8-compute MatMulNBits on the rows kernel (backends/ort_genai/kernels) where it can;
- "batched, onnxruntime kernels": the same runner on onnxruntime's own MatMulNBits (--no-compare-kernels
                skips it), the baseline of the ratio column;
- with --generators, "generators": OrtGenaiBackend(batching=False), one og.Generator per request side by
                side (the path before batching; then the baseline), and "og.Engine", onnxruntime-genai's own
                engine. On the serving export og.Engine cannot run (its static path reads full-sequence
                logits, the export's lm_head is pruned to the last position): the error is recorded, and it is
                measured on a copy of the export with the full lm_head instead.
Aggregate tok/s = all tokens / wall time (prefill included). TPOT = a stream's (last - first token time) /
(tokens - 1), p50/p95 over streams. Runs alternate strategies round-robin (the order rotates per repeat)
with a short pause between runs; medians (min-max) are reported. Correctness: each stream's tokens against
that prompt served alone by the same backend (greedy); the first position where a stream leaves it is
recorded. With --lean, also a copy laid out as the lean memory preset (the MLP at fp32 compute, whose batched
sums differ from one row's in the last bits). Writes benchmarks/results/ort_batching.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.base import GenerationRequest, SamplingParams  # noqa: E402
from backends.ort_genai import kernels  # noqa: E402
from backends.ort_genai.backend import OrtGenaiBackend  # noqa: E402
from benchmarks.common import QUESTIONS, busy_note, machine_info, percentile, summarize, write_json  # noqa: E402

log = logging.getLogger("bench_ort_batching")

PAUSE_S = 0.5
"""Between runs, so one strategy's spinning onnxruntime threads do not slow the next."""

Run = tuple[float, list[list[int]], list[float]]
"""(aggregate tok/s, each stream's tokens, each stream's TPOT in seconds)"""


def resolve_model(model: str) -> Path:
    """An exported folder: given directly, the tiny llama exported to fp32, or a reference exported to CPU int4."""
    folder = Path(model)
    if (folder / "genai_config.json").is_file():
        return folder
    from plugin.convert import export

    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_model

        tmp = Path(tempfile.mkdtemp(prefix="bench-ort-batching-"))
        source = build_tiny_model(tmp / "tiny-llama", "llama")
        return export(str(source), target="cpu", precision="fp32", home=tmp / "home").path
    return export(model, target="cpu", precision="int4").path


def variant(folder: Path, out: Path, edit: Callable[[Any], str]) -> tuple[Path | None, str]:
    """A copy of the export with its graph edited by `edit` (which returns what it changed, '' for nothing)."""
    import onnx

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    what = edit(proto.graph)
    if not what:
        return None, "nothing to change"
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "model.onnx" and f.is_file():
            shutil.copy2(f, out / f.name)  # onnxruntime refuses external data outside the model's folder
    onnx.save(proto, str(out / "model.onnx"))
    return out, what


def unprune_lm_head(graph: Any) -> str:
    """Feed lm_head every position again (the builder's `prune_lm_head` gathers the last one)."""
    prune = [n for n in graph.node if n.name.startswith("/lm_head/prune/")]
    if not prune:
        return ""
    gathered = prune[-1].output[0]
    source = next(n for n in prune if n.op_type == "Gather").input[0]
    kept = [n for n in graph.node if not n.name.startswith("/lm_head/prune/")]
    for node in kept:
        for i, name in enumerate(node.input):
            if name == gathered:
                node.input[i] = source
    del graph.node[:]
    graph.node.extend(kept)
    dim = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "sequence_length"
    return "lm_head on every position"


def lean_compute(graph: Any) -> str:
    """The lean memory preset's accuracy levels: its named 4-bit MatMulNBits at fp32 compute (level 0)."""
    from plugin.convert.fused_memory import MEMORY_PRESETS

    changed = 0
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        named = any(part in node.name for part in MEMORY_PRESETS["lean"])
        if node.op_type == "MatMulNBits" and named and attrs["bits"].i == 4 and attrs["accuracy_level"].i != 0:
            attrs["accuracy_level"].i, changed = 0, changed + 1
    return f"{changed} MatMulNBits at fp32 compute (the lean preset)" if changed else ""


class OneAtATime:
    """The benchmark's backends, loaded one at a time: each reserves KV cache for a full batch at full context
    in the host memory ledger, so two of them at 16 streams do not fit together. Loads happen between runs,
    outside every timed region."""

    def __init__(self) -> None:
        self.makers: dict[str, Callable[[], OrtGenaiBackend]] = {}
        self.name: str | None = None
        self.backend: OrtGenaiBackend | None = None

    def add(self, name: str, make: Callable[[], OrtGenaiBackend]) -> None:
        self.makers[name] = make

    def use(self, name: str) -> OrtGenaiBackend:
        if self.name != name or self.backend is None:
            self.close()
            backend = self.makers[name]()
            if backend._runner is None and backend._model is None:
                backend.load()
            self.name, self.backend = name, backend
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.unload()
        self.name, self.backend = None, None


def without_rows_kernel(folder: Path, max_streams: int) -> OrtGenaiBackend:
    """The batched backend on onnxruntime's own MatMulNBits (the switch is read when the session opens)."""
    os.environ[kernels.SWITCH_ENV] = "0"
    kernels.rows_kernel.cache_clear()
    try:
        backend = OrtGenaiBackend(folder, device="cpu", max_batch_size=max_streams)
        backend.load()
    finally:
        del os.environ[kernels.SWITCH_ENV]
        kernels.rows_kernel.cache_clear()
    return backend


def chat(text: str, max_new: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": text}], sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    )


def tpot(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")


def through_backend(backend: OrtGenaiBackend, prompts: list[str], max_new: int) -> Run:
    """N requests at once, one reader thread each."""
    outs: list[list[int]] = [[] for _ in prompts]
    stamps: list[list[float]] = [[] for _ in prompts]
    errors: list[str] = []
    start_line = threading.Barrier(len(prompts) + 1)

    def work(i: int) -> None:
        request = chat(prompts[i], max_new)
        start_line.wait()
        for chunk in backend.generate(request):
            if chunk.error:
                errors.append(chunk.error)
            if chunk.token_ids:
                outs[i].extend(chunk.token_ids)
                stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a stream failed: {errors[0]}")
    return sum(map(len, outs)) / elapsed, outs, [tpot(s) for s in stamps]


def through_engine(model: Any, prompt_ids: list[list[int]], max_new: int) -> Run:
    """og.Engine with every request submitted at once (its run loop is the one thread)."""
    import numpy as np
    import onnxruntime_genai as og

    engine = og.Engine(model)
    buffer = engine.create_event_buffer(64)
    requests = []
    for ids in prompt_ids:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(max_new)
        options.set_min_generated_tokens(max_new)
        options.set_do_sample(False)
        request.begin_turn(np.asarray(ids, dtype=np.int32), options)
        requests.append(request)
    outs: list[list[int]] = [[] for _ in prompt_ids]
    stamps: list[list[float]] = [[] for _ in prompt_ids]
    failures: list[str] = []
    start = time.perf_counter()
    try:
        while engine.has_pending_requests():
            for event in engine.run(buffer):
                i = next(k for k, r in enumerate(requests) if r is event.request)
                if event.flags.value & og.EngineEventFlags.TOKEN.value:
                    outs[i].append(int(event.token))
                    stamps[i].append(time.perf_counter())
                if event.flags.value & og.EngineEventFlags.FAILED.value:
                    failures.append(str(event.error_code))
    finally:
        for request in requests:
            request.close()
    elapsed = time.perf_counter() - start
    if failures:
        try:  # a failed static step leaves the engine unhealthy; its next call says why
            engine.create_request()
            cause = ""
        except Exception as exc:
            cause = f": {exc}"
        raise RuntimeError(f"{len(failures)} of {len(prompt_ids)} requests failed ({failures[0]}){cause}")
    return sum(map(len, outs)) / elapsed, outs, [tpot(s) for s in stamps]


def diverges_at(got: list[int], want: list[int]) -> int | None:
    """The first position where `got` leaves `want` (None: identical)."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


def equal_note(divergence: list[int | None]) -> str:
    """'6/8 (the others leave it at tokens [11, 24])'."""
    left = sorted(d for d in divergence if d is not None)
    note = f"{len(divergence) - len(left)}/{len(divergence)}"
    return note + (f" (the others leave it at tokens {left})" if left else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny', a model reference, or an export folder")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-engine", action="store_true", help="skip og.Engine (and the unpruned copy it needs)")
    parser.add_argument(
        "--lean", action="store_true", help="also a copy with the lean memory preset's fp32-compute MLP"
    )
    parser.add_argument(
        "--generators",
        action="store_true",
        help="also one og.Generator per request (the path before batching) and og.Engine; with --compare-kernels "
        "or --lean the memory ledger may not hold all of their KV reservations at once",
    )
    parser.add_argument(
        "--no-compare-kernels",
        dest="compare_kernels",
        action="store_false",
        help="skip the batched runner on onnxruntime's MatMulNBits (measured beside the rows kernel by default)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "ort_batching.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_new_tokens < 2 or min(args.streams) < 1:
        parser.error("--repeats >= 1, --max-new-tokens >= 2 and stream counts >= 1")
    logging.basicConfig(level=logging.WARNING)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = machine_info()
    folder = resolve_model(args.model)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(max(args.streams))]
    max_streams = max(args.streams)
    resident = OneAtATime()
    resident.add("batched", lambda: OrtGenaiBackend(folder, device="cpu", max_batch_size=max_streams))
    batched = resident.use("batched")
    loaded: list[OrtGenaiBackend] = []
    prompt_ids = [batched.encode(chat(p, args.max_new_tokens)) for p in prompts]
    console.print(f"{folder.name}: prompts of {sorted(set(map(len, prompt_ids)))} tokens; {batched.batching_reason}")
    console.print(f"batched kernels: {batched.kernels}")
    notes: dict[str, str] = {"batched": f"{batched.batching_reason}; {batched.kernels}"}
    names = ["batched"]
    if args.generators:
        resident.add(
            "generators", lambda: OrtGenaiBackend(folder, device="cpu", batching=False, max_batch_size=max_streams)
        )
        names.append("generators")
    if args.compare_kernels and batched.kernels.startswith("rows kernel"):
        resident.add("batched, onnxruntime kernels", lambda: without_rows_kernel(folder, max_streams))
        names.append("batched, onnxruntime kernels")
    # each strategy's streams are compared with the same strategy's backend serving that prompt alone
    references: dict[str, list[list[int]]] = {}
    strategies: dict[str, Callable[[int], Run]] = {}
    for name in names:
        backend = resident.use(name)
        references[name] = [through_backend(backend, [p], args.max_new_tokens)[1][0] for p in prompts]
        strategies[name] = lambda n, name=name: through_backend(resident.use(name), prompts[:n], args.max_new_tokens)
        notes.setdefault(name, f"the same runner, {backend.kernels}" if "kernels" in name else backend.batching_reason)
    generators = resident.use("generators") if args.generators else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-ort-batching-"))
    engine_models: list[Any] = []
    if not args.no_engine and generators is not None:
        try:
            through_engine(generators._model, prompt_ids[:1], 4)
            notes["og.Engine on the serving export"] = "ran"
        except Exception as exc:
            notes["og.Engine on the serving export"] = f"fails: {exc}".replace("\n", " ")
        copy, what = variant(folder, tmp / "full-lm-head", unprune_lm_head)
        if copy is not None:
            import onnxruntime_genai as og

            from backends.ort_genai.providers import PROVIDERS, build_config

            engine_models.append(og.Model(build_config(copy, PROVIDERS["cpu"])))
            strategies["og.Engine (full lm_head copy)"] = lambda n: through_engine(
                engine_models[0], prompt_ids[:n], args.max_new_tokens
            )
            notes["og.Engine (full lm_head copy)"] = f"a copy of the export with {what}"
    lean_backends: list[OrtGenaiBackend] = []
    if args.lean:
        copy, what = variant(folder, tmp / "lean", lean_compute)
        if copy is not None:
            for batching in (False, None):
                b = OrtGenaiBackend(copy, device="cpu", batching=batching, max_batch_size=max_streams)
                b.load()
                lean_backends.append(b)
                loaded.append(b)
            references["batched, lean copy"] = [
                through_backend(lean_backends[0], [p], args.max_new_tokens)[1][0] for p in prompts
            ]
            strategies["batched, lean copy"] = lambda n: through_backend(
                lean_backends[1], prompts[:n], args.max_new_tokens
            )
            notes["batched, lean copy"] = f"a copy of the export with {what}; compared with it alone"

    load_before = list(os.getloadavg())
    runs: dict[str, dict[int, list[Run]]] = {name: {n: [] for n in args.streams} for name in strategies}
    failed: dict[str, dict[int, str]] = {name: {} for name in strategies}
    names = list(strategies)
    for rep in range(args.repeats + 1):  # the first round warms up and is not counted
        for n in args.streams:
            for k in range(len(names)):
                name = names[(k + rep) % len(names)]
                if n in failed[name]:
                    continue
                try:
                    result = strategies[name](n)
                except Exception as exc:
                    failed[name][n] = str(exc).replace("\n", " ")
                    continue
                if rep:
                    runs[name][n].append(result)
                time.sleep(PAUSE_S)
        console.print(f"round {rep}/{args.repeats} done (load {os.getloadavg()[0]:.2f})")
    load_after = list(os.getloadavg())

    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        reference = references.get(name) or references["generators"]  # og.Engine: against one generator alone
        per_n: dict[str, Any] = {}
        for n in args.streams:
            if n in failed[name]:
                per_n[str(n)] = {"error": failed[name][n]}
                continue
            rates = [r[0] for r in runs[name][n]]
            tpots = [t for r in runs[name][n] for t in r[2]]
            last = runs[name][n][-1][1]
            divergence = [diverges_at(got, want) for got, want in zip(last, reference, strict=False)]
            per_n[str(n)] = {
                "aggregate_tok_s": summarize(rates),
                "aggregate_runs": rates,
                "tpot_ms_p50": percentile(tpots, 50) * 1000,
                "tpot_ms_p95": percentile(tpots, 95) * 1000,
                "streams_equal_alone": sum(d is None for d in divergence),
                "first_divergence": divergence,
            }
        rows[name] = per_n
    baseline = "generators" if "generators" in rows else names[-1]  # else the runner on onnxruntime's kernels
    for name in names:
        for n in args.streams:
            base = rows[baseline][str(n)].get("aggregate_tok_s")
            row = rows[name][str(n)]
            if "aggregate_tok_s" in row and base is not None:
                row["vs_baseline"] = row["aggregate_tok_s"].median / base.median

    table = Table(title=f"{args.max_new_tokens} new tokens per stream, greedy; medians (min-max) of {args.repeats}")
    for col in ("streams", "strategy", "aggregate tok/s", f"vs {baseline}", "TPOT ms p50 / p95", "streams = alone"):
        table.add_column(col)
    for n in args.streams:
        for name in names:
            row = rows[name][str(n)]
            if "error" in row:
                table.add_row(str(n), name, f"failed: {row['error'][:80]}", "-", "-", "-")
                continue
            table.add_row(
                str(n),
                name,
                row["aggregate_tok_s"].fmt(1),
                f"{row['vs_baseline']:.2f}x",
                f"{row['tpot_ms_p50']:.1f} / {row['tpot_ms_p95']:.1f}",
                equal_note(row["first_divergence"]),
            )
    console.print(table)
    for name, note in notes.items():
        console.print(f"{name}: {note}")
    note = busy_note()
    if note:
        console.print(f"[yellow]{note}[/yellow]")
    console.print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    result = {
        "model": args.model,
        "export": folder.name,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "prompt_tokens": [len(p) for p in prompt_ids],
        "strategies": rows,
        "notes": notes,
        "baseline": baseline,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "machine": info,
        "busy": note,
    }
    path = write_json(args.output, result)
    console.print(f"wrote {path}")
    resident.close()
    for b in loaded:
        b.unload()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
