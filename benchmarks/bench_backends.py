"""Our backends beside the bare engines they wrap, per precision: TTFT, decode tok/s, concurrency, memory, load.

    python benchmarks/bench_backends.py                  # default model, every backend x precision
    accelserve bench backends --quick                    # smoke run: 1 run, 8 tokens, 1 and 2 streams
    python benchmarks/bench_backends.py --model path/to/hf_folder --configs torch:fp32,ort:int4

Configurations: torch fp32/bf16 (TorchBackend vs plain `model.generate`), onnxruntime-genai int4/int8/fp32
exports (OrtGenaiBackend vs the plain onnxruntime-genai generate loop), and llama.cpp on the original GGUF
when `llama-cpp-python` is importable (an outside anchor; never installed by us).

How each number is taken (greedy, one chat prompt, EOS ignored where the engine allows it):
- TTFT: request submitted -> first generated token (ours includes chat template and tokenization; the
  bare loops start from token ids, so our TTFT overhead includes that work on purpose).
- decode tok/s at batch 1: (tokens - 1) / (last token time - first token time).
- aggregate tok/s at N streams: all tokens / wall time of N concurrent requests through our backend
  (prefill included), with the backend's default max batch size (what the engine serves with).
- TPOT at N streams: each stream's time per output token after its first ((last - first) / (tokens - 1)),
  p50 and p95 over every stream of every run.
- llama.cpp at N streams: llama.cpp's own parallel decoding of the same GGUF (llama-cpp-python's low-level
  batch API: the N prompts prefilled as N sequences of one batch, then one decode call per step with one
  token per sequence, greedy on the host), the same chats and token counts: engine to engine.
- peak RSS single stream: the high-water mark after load and one batch-1 request, before anything else
  (the bare engine's own model, more streams) is in the process.
- targets (issue 17), when the int4 row and llama.cpp are both measured: int4 aggregate at 8 streams vs its
  own single stream and vs llama.cpp at 8 sequences, single-stream decode and peak RSS vs llama.cpp, TPOT
  p50 at 8 streams vs 1.
- overhead: ours / bare, as the median of per-run ratios of back-to-back paired runs (alternating which
  goes first), which is robust to background load changing between pairs.
- load time and peak RSS: each configuration runs in its own subprocess (ours and bare separately), so
  the peak resident set of one never includes another's weights; load time is the median of repeated
  loads in that process (the first read may come from disk, later ones from the page cache).
Medians over --runs runs after one warm-up, with min and max.
Writes benchmarks/results/backends.json and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    QUESTIONS,
    RESULTS_DIR,
    ROOT,
    Stats,
    busy_note,
    machine_info,
    peak_rss_bytes,
    plot_bars,
    plot_lines,
    ratio,
    rss_bytes,
    summarize,
    write_json,
)

log = logging.getLogger("bench_backends")

TORCH = "torch"
GENAI = "onnxruntime-genai"
LLAMA_CPP = "llama.cpp"
ALIASES = {"ort": GENAI, "og": GENAI, "onnxruntime-genai": GENAI, "torch": TORCH, "llama.cpp": LLAMA_CPP}
DEFAULT_CONFIGS = ((TORCH, "fp32"), (TORCH, "bf16"), (GENAI, "int4"), (GENAI, "int8"), (GENAI, "fp32"))
PRECISIONS = {TORCH: ("fp32", "bf16", "fp16"), GENAI: ("int4", "int8", "fp32")}
BARE_NAME = {TORCH: "model.generate", GENAI: "og generate loop", LLAMA_CPP: "llama-cpp-python"}
OURS_NAME = {TORCH: "TorchBackend", GENAI: "OrtGenaiBackend"}
SHORT = {GENAI: "ort"}
PROMPT = "Write a long story about a lighthouse keeper and a storm."


@dataclass(frozen=True)
class Config:
    engine: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision}"


def parse_configs(text: str | None, llama_available: bool) -> list[Config]:
    """'torch:fp32,ort:int4' -> configs; None -> every default one (plus llama.cpp when importable)."""
    if not text:
        configs = [Config(e, p) for e, p in DEFAULT_CONFIGS]
        return [*configs, Config(LLAMA_CPP, "gguf")] if llama_available else configs
    out = []
    for item in text.split(","):
        engine, _, precision = item.strip().partition(":")
        engine = ALIASES.get(engine.strip().lower(), "")
        if engine == LLAMA_CPP:
            if not llama_available:
                raise ValueError("llama.cpp was asked for but llama-cpp-python is not importable; drop it or install")
            out.append(Config(LLAMA_CPP, "gguf"))
            continue
        if not engine or precision not in PRECISIONS[engine]:
            raise ValueError(
                f"cannot parse configuration {item.strip()!r}; use engine:precision with engine torch "
                f"({'/'.join(PRECISIONS[TORCH])}), ort ({'/'.join(PRECISIONS[GENAI])}) or llama.cpp, "
                "e.g. 'torch:fp32,ort:int4'"
            )
        out.append(Config(engine, precision))
    return out


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---- measuring (runs inside a worker) -----------------------------------------------------------------


@dataclass
class Run:
    ttft_s: float
    decode_tps: float
    tokens: int
    wall_s: float


def _rate(first: float | None, last: float | None, n: int) -> float:
    if first is None or last is None or n < 2 or last <= first:
        return float("nan")
    return (n - 1) / (last - first)


def time_stream(chunks: Iterator[Any], t0: float) -> Run:
    """Time a TokenChunk stream that was submitted at `t0`."""
    first = last = None
    n = 0
    for chunk in chunks:
        if chunk.token_ids:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            n += len(chunk.token_ids)
    wall = time.perf_counter() - t0
    return Run(first - t0 if first is not None else float("nan"), _rate(first, last, n), n, wall)


def from_wall(wall_s: float, decode_tps: float, tokens: int) -> Run:
    """A bare run timed from outside: TTFT = wall - (tokens - 1) / decode rate (the span of the later tokens)."""
    span = (tokens - 1) / decode_tps if tokens > 1 and decode_tps and decode_tps == decode_tps else 0.0
    return Run(wall_s - span, decode_tps, tokens, wall_s)


def _request(text: str, new_tokens: int) -> Any:
    from backends.base import GenerationRequest, SamplingParams

    return GenerationRequest(
        messages=[{"role": "user", "content": text}], sampling=SamplingParams(max_new_tokens=new_tokens)
    )


def _our_backend(spec: dict[str, Any]) -> Any:
    if spec["engine"] == TORCH:
        from backends.torch.backend import TorchBackend

        return TorchBackend(spec["path"], device="cpu", dtype=spec["precision"])
    from backends.ort_genai.backend import OrtGenaiBackend

    return OrtGenaiBackend(spec["path"], device="cpu")


def _bare_run(spec: dict[str, Any], backend: Any, new_tokens: int) -> Callable[[], Run]:
    """The bare engine on the backend's own loaded weights, reusing the existing benchmarks' loops."""
    request = _request(PROMPT, new_tokens)
    if spec["engine"] == TORCH:
        from benchmarks.bench_torch_batching import run_plain

        ids = backend.prompt_ids(request)

        def run() -> Run:
            r = run_plain(backend, ids, new_tokens)
            return from_wall(r["wall_s"], r["decode_tps"], r["tokens"])

        return run
    from benchmarks.bench_ort_overhead import bare_loop

    ids = backend.encode(request)

    def run_og() -> Run:
        t0 = time.perf_counter()
        rate, tokens = bare_loop(backend, ids, new_tokens)
        return from_wall(time.perf_counter() - t0, rate, len(tokens))

    return run_og


def measure_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Our backend: load, paired batch-1 runs against the bare engine on the same weights, concurrency."""
    runs, new_tokens = spec["runs"], spec["new_tokens"]
    _preimport(spec["engine"])  # library import time is not load time, on either side
    rss_start = rss_bytes()
    backend = _our_backend(spec)
    t0 = time.perf_counter()
    backend.load()
    loads = [time.perf_counter() - t0]
    rss_loaded = rss_bytes()
    caps = backend.capabilities()
    if spec["engine"] == TORCH:
        backend.eos_ids = frozenset()  # fixed-length runs: equal work on both sides
    else:
        backend._eos_ids = frozenset()  # our side; onnxruntime-genai itself still stops at EOS
    request = lambda: _request(PROMPT, new_tokens)  # noqa: E731 - a fresh request id per run
    bare = _bare_run(spec, backend, new_tokens)

    def ours() -> Run:
        t = time.perf_counter()
        return time_stream(backend.generate(request()), t)

    ours()  # warm-up: allocator, kernels, lazy init
    peak_single = peak_rss_bytes()  # load + one request, before the bare engine's model joins the process
    bare()
    ours_runs: list[Run] = []
    bare_runs: list[Run] = []
    for i in range(runs):
        if i % 2:  # alternate which side goes first in a pair
            ours_runs.append(ours())
            bare_runs.append(bare())
        else:
            bare_runs.append(bare())
            ours_runs.append(ours())

    concurrency: dict[str, dict[str, Any]] = {}
    for streams in spec["concurrency"]:
        samples = [concurrent(backend, streams, new_tokens) for _ in range(runs)]
        concurrency[str(streams)] = concurrency_entry(samples)
    peak = peak_rss_bytes()
    for _ in range(runs - 1):  # more loads for a load-time median (after the peak RSS is taken)
        backend.unload()
        t0 = time.perf_counter()
        backend.load()
        loads.append(time.perf_counter() - t0)
    backend.unload()
    pairs = list(zip(ours_runs, bare_runs, strict=True))
    return {
        "side": "ours",
        "name": OURS_NAME[spec["engine"]],
        "provider": caps.provider,
        "device": caps.device,
        "precision": caps.precision,
        "max_batch_size": caps.max_batch_size,
        "threads": _threads(spec["engine"]),
        "load_s": summarize(loads),
        "rss_start_bytes": rss_start,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak,
        "peak_rss_single_stream_bytes": peak_single,
        "batching": getattr(backend, "batching_reason", None),
        "ttft_s": summarize(r.ttft_s for r in ours_runs),
        "decode_tps": summarize(r.decode_tps for r in ours_runs),
        "tokens_per_run": [r.tokens for r in ours_runs],
        "concurrency": concurrency,
        "bare_same_process": {
            "name": BARE_NAME[spec["engine"]],
            "ttft_s": summarize(r.ttft_s for r in bare_runs),
            "decode_tps": summarize(r.decode_tps for r in bare_runs),
            "tokens_per_run": [r.tokens for r in bare_runs],
        },
        "overhead": {
            "decode_tps_ratio": summarize(ratio(o.decode_tps, b.decode_tps) for o, b in pairs),
            "ttft_ratio": summarize(ratio(o.ttft_s, b.ttft_s) for o, b in pairs),
        },
    }


def concurrent(backend: Any, streams: int, new_tokens: int) -> dict[str, float]:
    """`streams` different chats submitted together, each read on its own thread: all tokens / wall time.

    The same measurement as bench_torch_batching.run_backend, written here without its torch import so
    that an onnxruntime-genai worker's peak RSS holds no torch.
    """
    results: list[Run | None] = [None] * streams
    t0 = time.perf_counter()
    chunks = [backend.generate(_request(QUESTIONS[i % len(QUESTIONS)], new_tokens)) for i in range(streams)]

    def read(i: int) -> None:
        results[i] = time_stream(chunks[i], t0)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    total = sum(r.tokens for r in done)
    return {
        "tokens": total,
        "aggregate_tps": total / wall,
        "ttft_s_median": summarize(r.ttft_s for r in done).median,
        "tpot_s": [1.0 / r.decode_tps for r in done if r.decode_tps == r.decode_tps and r.decode_tps > 0],
    }


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50 / p95 (linear interpolation) of per-stream times per output token; None when there were none."""
    import numpy as np

    xs = [v for v in values if v == v]
    if not xs:
        return {"p50": None, "p95": None, "n": 0}
    return {"p50": float(np.percentile(xs, 50)), "p95": float(np.percentile(xs, 95)), "n": len(xs)}


def concurrency_entry(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One stream count's numbers over its runs (the same shape for every engine)."""
    return {
        "aggregate_tps": summarize(s["aggregate_tps"] for s in samples),
        "ttft_s": summarize(s["ttft_s_median"] for s in samples),
        "tpot_s": percentiles([t for s in samples for t in s["tpot_s"]]),
        "tokens": [s["tokens"] for s in samples],
    }


def _preimport(engine: str) -> None:
    if engine == TORCH:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    else:
        import onnxruntime_genai  # noqa: F401


def _threads(engine: str) -> int | None:
    if engine == TORCH:
        import torch

        return torch.get_num_threads()
    return None  # onnxruntime's default: one intra-op thread per physical core


def measure_bare_load(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare engine alone: load time and peak RSS with one generation (its inference working set)."""
    runs, new_tokens = spec["runs"], spec["new_tokens"]
    _preimport(spec["engine"])
    rss_start = rss_bytes()
    load, generate = _bare_loader(spec)
    loads = []
    for i in range(runs):
        t0 = time.perf_counter()
        handle = load()
        loads.append(time.perf_counter() - t0)
        if i == 0:
            rss_loaded = rss_bytes()
            generate(handle, new_tokens)
            peak = peak_rss_bytes()
        del handle
    return {
        "side": "bare",
        "name": BARE_NAME[spec["engine"]],
        "load_s": summarize(loads),
        "rss_start_bytes": rss_start,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak,
    }


def _bare_loader(spec: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[Any, int], None]]:
    path = spec["path"]
    if spec["engine"] == TORCH:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from backends.torch.backend import DTYPES

        def load_torch() -> Any:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[spec["precision"]], attn_implementation="sdpa"
            )
            return model.eval(), tok

        def gen_torch(handle: Any, n: int) -> None:
            model, tok = handle
            ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
            ids = torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)

        return load_torch, gen_torch
    if spec["engine"] == GENAI:
        import onnxruntime_genai as og

        def load_og() -> Any:
            config = og.Config(str(path))
            config.clear_providers()  # the CPU provider, as our backend runs here
            model = og.Model(config)
            return model, og.Tokenizer(model)

        def gen_og(handle: Any, n: int) -> None:
            model, tok = handle
            ids = tok.encode(PROMPT)
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + n, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(ids)
            while not generator.is_done():
                generator.generate_next_token()

        return load_og, gen_og
    raise ValueError(f"no bare loader for {spec['engine']!r}")


def measure_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp on the original GGUF (outside anchor): load, TTFT and decode tok/s at batch 1 (its Python
    chat API), then its own parallel decoding of 1..N sequences in shared batches (llamacpp_parallel.py)."""
    from llama_cpp import Llama

    runs, new_tokens = spec["runs"], spec["new_tokens"]
    threads = int(spec.get("threads") or os.cpu_count() or 1)
    rss_start = rss_bytes()
    loads = []
    t0 = time.perf_counter()
    llm = Llama(model_path=str(spec["path"]), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    loads.append(time.perf_counter() - t0)
    rss_loaded = rss_bytes()
    messages = [{"role": "user", "content": PROMPT}]

    def once(model: Any) -> Run:
        t = time.perf_counter()
        first = last = None
        n = 0
        parts = model.create_chat_completion(messages=messages, max_tokens=new_tokens, temperature=0.0, stream=True)
        for part in parts:
            if part["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first if first is not None else now
                last, n = now, n + 1
        return Run(first - t if first is not None else float("nan"), _rate(first, last, n), n, time.perf_counter() - t)

    once(llm)
    samples = [once(llm) for _ in range(runs)]
    peak_single = peak_rss_bytes()
    llm = None
    for _ in range(runs - 1):
        t0 = time.perf_counter()
        again = Llama(model_path=str(spec["path"]), n_ctx=2048, verbose=False)
        loads.append(time.perf_counter() - t0)
        del again
    concurrency = llama_cpp_parallel(spec, threads)
    return {
        "side": "bare",
        "name": BARE_NAME[LLAMA_CPP],
        "provider": "llama.cpp CPU",
        "precision": "gguf",
        "load_s": summarize(loads),
        "rss_start_bytes": rss_start,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_single_stream_bytes": peak_single,
        "threads": threads,
        "ttft_s": summarize(r.ttft_s for r in samples),
        "decode_tps": summarize(r.decode_tps for r in samples),
        "tokens_per_run": [r.tokens for r in samples],
        "concurrency": concurrency,
        "note": "batch 1: llama-cpp-python's chat API, text pieces counted as tokens (one token per chunk); "
        "N streams: llama.cpp's parallel decoding of N sequences in shared batches (low-level API, greedy)",
    }


def llama_cpp_parallel(spec: dict[str, Any], threads: int) -> dict[str, dict[str, Any]]:
    """llama.cpp decoding 1..N of the benchmark's chats as sequences of one batch, `runs` times per count."""
    from benchmarks.llamacpp_parallel import ParallelLlama

    prompts: list[list[int]] = spec["prompt_ids"]
    engine = ParallelLlama(str(spec["path"]), threads)
    try:
        engine.run(prompts[:1], 4)  # warm-up
        out: dict[str, dict[str, Any]] = {}
        for streams in spec["concurrency"]:
            samples = []
            for _ in range(spec["runs"]):
                wall, times = engine.run([prompts[i % len(prompts)] for i in range(streams)], spec["new_tokens"])
                samples.append(
                    {
                        "tokens": streams * spec["new_tokens"],
                        "aggregate_tps": streams * spec["new_tokens"] / wall,
                        "ttft_s_median": summarize(t.ttft_s for t in times).median,
                        "tpot_s": [t.tpot_s for t in times],
                    }
                )
            out[str(streams)] = concurrency_entry(samples)
        return out
    finally:
        engine.close()


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ours": measure_ours,
    "bare": measure_bare_load,
    "llama.cpp": measure_llama_cpp,
}


def run_worker(spec: dict[str, Any], isolated: bool) -> dict[str, Any]:
    """Run one measurement in its own Python process (isolated) or here (tests, --in-process)."""
    if not isolated:
        return _revive(json.loads(json.dumps(_plain(WORKERS[spec["kind"]](spec)))))
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "benchmarks.bench_backends", "--worker", json.dumps(spec)]
        cmd += ["--worker-out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark worker {spec['kind']} {spec['engine']} {spec['precision']} failed:\n{tail}")
        return _revive(json.loads(out.read_text()))


def _plain(obj: Any) -> Any:
    from benchmarks.common import _jsonable

    return _jsonable(obj)


def _revive(obj: Any) -> Any:
    """JSON dicts with exactly the Stats fields back into Stats (null -> NaN)."""
    if isinstance(obj, dict):
        if set(obj) == {"median", "min", "max", "n"}:
            nan = float("nan")
            return Stats(*(nan if obj[k] is None else float(obj[k]) for k in ("median", "min", "max")), int(obj["n"]))
        return {k: _revive(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_revive(v) for v in obj]
    return obj


# ---- orchestration --------------------------------------------------------------------------------------


def prepare_path(config: Config, model: Any, home: Path | None) -> Path:
    """What the worker loads: the HF folder for torch, a cached export for onnxruntime-genai, the GGUF for llama.cpp."""
    if config.engine == TORCH:
        return model.path
    if config.engine == LLAMA_CPP:
        from plugin.models.resolve import default_model_gguf

        if model.source != "default":
            raise ValueError("llama.cpp is compared on the default model's GGUF only; pass --model default")
        return default_model_gguf()
    from plugin.convert import export

    return export(model.path, target="cpu", precision=config.precision, parity=False, home=home, progress=False).path


def benchmark(args: argparse.Namespace, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure every configuration; returns the result document (also what the JSON holds)."""
    from plugin.models.resolve import resolve_model

    machine = machine_info()
    model = resolve_model(args.model)
    configs = parse_configs(args.configs, llama_cpp_available())
    common = {"runs": args.runs, "new_tokens": args.new_tokens, "concurrency": args.concurrency}
    rows = []
    for config in configs:
        progress(f"{config.label}: preparing")
        path = prepare_path(config, model, None)
        spec = {**common, "engine": config.engine, "precision": config.precision, "path": str(path)}
        row: dict[str, Any] = {"engine": config.engine, "precision": config.precision, "model_file": Path(path).name}
        if config.engine == LLAMA_CPP:
            progress(f"{config.label}: llama.cpp")
            spec["prompt_ids"] = chat_prompt_ids(model.path)
            row["bare"] = run_worker({**spec, "kind": "llama.cpp"}, not args.in_process)
        else:
            progress(f"{config.label}: {OURS_NAME[config.engine]} vs {BARE_NAME[config.engine]}")
            row["ours"] = run_worker({**spec, "kind": "ours"}, not args.in_process)
            progress(f"{config.label}: bare {BARE_NAME[config.engine]} load and memory")
            bare = run_worker({**spec, "kind": "bare"}, not args.in_process)
            bare.update(row["ours"].pop("bare_same_process"))
            row["bare"] = bare
            row["overhead"] = row["ours"].pop("overhead")
            row["overhead"]["load_s_ratio"] = ratio(row["ours"]["load_s"].median, bare["load_s"].median)
            row["overhead"]["peak_rss_ratio"] = ratio(row["ours"]["peak_rss_bytes"], bare["peak_rss_bytes"])
        rows.append(row)
    return {
        "benchmark": "backends",
        "targets": targets(rows),
        "model": {"ref": str(args.model), "name": model.profile.name, "parameters": model.profile.num_parameters},
        "settings": {
            **common,
            "quick": args.quick,
            "isolation": "in-process (RSS not isolated)" if args.in_process else "one subprocess per side and config",
            "prompt": PROMPT,
            "greedy": True,
        },
        "llama_cpp": "included" if any(c.engine == LLAMA_CPP for c in configs) else "llama-cpp-python not importable",
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "busy_warning": busy_note(),
        "rows": rows,
    }


def chat_prompt_ids(model_path: Path) -> list[list[int]]:
    """The token ids our backends get for the concurrent chats (the checkpoint's chat template), for llama.cpp."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    out = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        out.append([int(t) for t in (ids if isinstance(ids, list) else ids["input_ids"])])
    return out


# issue 17's targets: (name, value, goal, higher is better)
TARGET_GOALS = {
    "int4 aggregate x8 / its own x1": (3.0, True),
    "int4 aggregate x8 / llama.cpp x8": (1.0, True),
    "int4 single-stream decode / llama.cpp": (1.4, True),
    "int4 peak RSS (single stream) / llama.cpp": (1.3, False),
    "int4 TPOT p50 x8 / x1": (2.5, False),
}


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 17's ratios from one run, when the int4 onnxruntime-genai row and llama.cpp were both measured.

    llama.cpp's single-stream decode is the faster of its two batch-1 measurements (chat API, or one sequence
    through its batch API), so the ratio is never flattered by the slower one."""
    ours = next((r["ours"] for r in rows if r["engine"] == GENAI and r["precision"] == "int4" and "ours" in r), None)
    llama = next((r["bare"] for r in rows if r["engine"] == LLAMA_CPP), None)
    if ours is None:
        return {"note": "no int4 onnxruntime-genai row measured"}
    conc = ours.get("concurrency", {})

    def agg(c: dict[str, Any], n: int) -> float:
        return c[str(n)]["aggregate_tps"].median if str(n) in c else float("nan")

    def tpot(c: dict[str, Any], n: int) -> float:
        return (c.get(str(n), {}).get("tpot_s") or {}).get("p50") or float("nan")

    values = {
        "int4 aggregate x8 / its own x1": ratio(agg(conc, 8), agg(conc, 1)),
        "int4 TPOT p50 x8 / x1": ratio(tpot(conc, 8), tpot(conc, 1)),
    }
    if llama is not None:
        lconc = llama.get("concurrency", {})
        one_seq = 1.0 / tpot(lconc, 1) if tpot(lconc, 1) == tpot(lconc, 1) else float("nan")
        llama_decode = max(x for x in (llama["decode_tps"].median, one_seq) if x == x) if lconc else float("nan")
        values["int4 aggregate x8 / llama.cpp x8"] = ratio(agg(conc, 8), agg(lconc, 8))
        values["int4 single-stream decode / llama.cpp"] = ratio(ours["decode_tps"].median, llama_decode)
        values["int4 peak RSS (single stream) / llama.cpp"] = ratio(
            ours.get("peak_rss_single_stream_bytes"), llama.get("peak_rss_single_stream_bytes")
        )
    out: dict[str, Any] = {}
    for name, (goal, higher) in TARGET_GOALS.items():
        value = values.get(name)
        met = None if value is None or value != value else (value >= goal if higher else value <= goal)
        out[name] = {"value": value, "goal": f"{'>=' if higher else '<='} {goal}", "met": met}
    return out


# ---- reporting ------------------------------------------------------------------------------------------


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def _x(s: Stats) -> str:
    return "-" if not s.n else f"{s.median:.2f}x"


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    streams = [str(c) for c in result["settings"]["concurrency"]]
    m = result["model"]
    table = Table(title=f"Backends on {m['name']} - median (min-max) of {result['settings']['runs']} runs")
    for col in ("config", "runs on", "engine", "load s", "peak RSS MB", "x1 peak MB", "TTFT ms", "decode tok/s"):
        table.add_column(col, justify="left" if col in ("config", "engine", "runs on") else "right")
    for row in result["rows"]:
        for side in ("ours", "bare"):
            r = row.get(side)
            if r is None:
                continue
            ttft = r.get("ttft_s")
            conc = r.get("concurrency", {})
            provider = r.get("provider", row["ours"]["provider"] if "ours" in row else "-")
            table.add_row(
                f"{SHORT.get(row['engine'], row['engine'])} {row['precision']}",
                provider.removesuffix("ExecutionProvider"),
                f"{side}: {r['name']}",
                r["load_s"].fmt(2),
                _mb(r.get("peak_rss_bytes")),
                _mb(r.get("peak_rss_single_stream_bytes")),
                Stats(ttft.median * 1e3, ttft.min * 1e3, ttft.max * 1e3, ttft.n).fmt(0) if ttft else "-",
                r["decode_tps"].fmt(1) if "decode_tps" in r else "-",
            )
        if "overhead" in row:
            o = row["overhead"]
            table.add_row(
                "",
                "",
                "[dim]ours / bare[/]",
                f"[dim]{o['load_s_ratio']:.2f}x[/]",
                f"[dim]{o['peak_rss_ratio']:.2f}x[/]",
                f"[dim]{_x(o['ttft_ratio'])}[/]",
                "",
                f"[dim]{_x(o['decode_tps_ratio'])}[/]",
                end_section=True,
            )
    console.print(table)
    conc_table = Table(title="Concurrent streams: aggregate tok/s (median) and time per output token p50/p95 ms")
    for col in ("config", "engine"):
        conc_table.add_column(col)
    for s in streams:
        conc_table.add_column(f"x{s} tok/s", justify="right")
        conc_table.add_column(f"x{s} TPOT", justify="right")
    for row in result["rows"]:
        for side in ("ours", "bare"):
            conc = (row.get(side) or {}).get("concurrency")
            if not conc:
                continue
            cells = []
            for s in streams:
                entry = conc.get(s)
                tpot = (entry or {}).get("tpot_s") or {}
                cells.append(entry["aggregate_tps"].fmt(1) if entry else "-")
                cells.append(f"{tpot['p50'] * 1e3:.1f}/{tpot['p95'] * 1e3:.1f}" if tpot.get("p50") is not None else "-")
            name = f"{SHORT.get(row['engine'], row['engine'])} {row['precision']}"
            conc_table.add_row(name, row[side]["name"], *cells)
    console.print(conc_table)
    goals = result.get("targets") or {}
    if any(isinstance(v, dict) for v in goals.values()):
        t = Table(title="Issue 17 targets, measured side by side in this run")
        for col in ("target", "value", "goal", "met"):
            t.add_column(col)
        for name, v in goals.items():
            if isinstance(v, dict):
                value = "-" if v["value"] is None or v["value"] != v["value"] else f"{v['value']:.2f}"
                t.add_row(name, value, v["goal"], {True: "yes", False: "NO", None: "-"}[v["met"]])
        console.print(t)


def make_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Plots beside the JSON, named after it (backends.json -> backends_decode.png, ...)."""
    rows = [r for r in result["rows"] if "bare" in r]
    labels = [f"{r['engine']}\n{r['precision']}" for r in rows]
    empty = Stats(float("nan"), float("nan"), float("nan"), 0)
    note = f"{result['model']['name']}, {result['machine']['cpu_model']}, {result['machine']['logical_cores']} cores"
    paths = [
        plot_bars(
            out.with_name(f"{out.stem}_decode.png"),
            "Decode tokens/s at batch 1 (median, min-max)",
            labels,
            {
                "ours": [r["ours"]["decode_tps"] if "ours" in r else empty for r in rows],
                "bare engine": [r["bare"].get("decode_tps", empty) for r in rows],
            },
            "tokens/s",
            note,
        ),
        plot_bars(
            out.with_name(f"{out.stem}_ttft.png"),
            "Time to first token at batch 1 (median, min-max)",
            labels,
            {
                "ours": [_ms(r["ours"]["ttft_s"]) if "ours" in r else empty for r in rows],
                "bare engine": [_ms(r["bare"].get("ttft_s", empty)) for r in rows],
            },
            "milliseconds",
            note,
        ),
    ]
    conc = [r for r in rows if "ours" in r]
    streams = result["settings"]["concurrency"]
    if conc and len(streams) > 1:
        paths.append(
            plot_lines(
                out.with_name(f"{out.stem}_concurrency.png"),
                "Aggregate tokens/s vs concurrent streams (our backends)",
                streams,
                {f"{r['engine']} {r['precision']}": [_agg(r, s) for s in streams] for r in conc},
                "concurrent streams",
                "tokens/s (all streams, incl. prefill)",
                note,
            )
        )
    return paths


def _agg(row: dict[str, Any], streams: int) -> Stats:
    return row["ours"]["concurrency"][str(streams)]["aggregate_tps"]


def _ms(s: Stats) -> Stats:
    return Stats(s.median * 1e3, s.min * 1e3, s.max * 1e3, s.n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="'default', an HF checkpoint folder, a .gguf or a cached hub id")
    p.add_argument("--configs", help="comma list of engine:precision, e.g. torch:fp32,ort:int4 (default: all)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per number, after one warm-up (default 5)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma list of concurrent stream counts")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run, 8 tokens, 1 and 2 streams")
    p.add_argument("--in-process", action="store_true", help="measure in this process (peak RSS is then shared)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "backends.json", help="JSON path; plots go beside it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.quick:
        args.runs, args.new_tokens, args.concurrency = 1, 8, "1,2"
    try:
        args.concurrency = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    except ValueError:
        parser.error(f"--concurrency must be a comma list of integers like 1,4,8,16 (got {args.concurrency!r})")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency needs stream counts >= 1, e.g. 1,4,8,16")
    if args.runs < 1:
        parser.error("--runs must be >= 1 (5 or more for publishable medians)")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (a decode rate needs two tokens)")
    try:
        parse_configs(args.configs, llama_cpp_available())
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        spec = json.loads(args.worker)
        write_json(args.worker_out, WORKERS[spec["kind"]](spec))
        return 0
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    note = busy_note()
    if note:
        console.print(f"[yellow]warning:[/] {note}")
    started = time.perf_counter()
    with console.status("benchmarking backends") as status:
        result = benchmark(args, lambda text: status.update(f"benchmarking backends: {text}"))
    result["wall_s"] = time.perf_counter() - started
    print_table(result, console)
    if result["busy_warning"]:
        console.print(f"[yellow]warning:[/] {result['busy_warning']}")
    out = write_json(args.out, result)
    console.print(f"wrote {out}")
    if not args.no_plots:
        for path in make_plots(result, out):
            console.print(f"wrote {path}")
    if out.resolve() == (RESULTS_DIR / "backends.json").resolve():  # the full run: keep RESULTS.md in step
        from benchmarks.report import write_results_md

        console.print(f"wrote {write_results_md()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
