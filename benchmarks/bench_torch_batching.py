"""Throughput of the torch backend's continuous batching against plain `model.generate`, side by side.

For each repeat, in one process and on the same loaded weights:
  1. plain `model.generate` (batch 1, greedy, SDPA), tokens timed with a streamer;
  2. TorchBackend, one stream;
  3. TorchBackend, N concurrent streams (different prompts, submitted together from N threads).
Every run generates exactly `--new-tokens` tokens (EOS is ignored) so the rates compare like with like.
Decode rate = (tokens - 1) / (last token time - first token time) per stream; aggregate rate = all new
tokens / wall time from submission to the last token (includes prefill). Medians over the repeats.

Runs on CUDA when torch sees a GPU (the numbers are then GPU numbers and labelled so), else on the CPU.
Usage: python benchmarks/bench_torch_batching.py [--model default] [--streams 8] [--repeats 3] [--threads 1]

On a small CPU shared with other processes, `--threads 1` is faster and far steadier: a 2-thread OpenMP
region on a busy core waits a scheduler tick (~16 ms) per matmul, which hits the batched [8, hidden]
GEMMs (batch-1 GEMVs run single-threaded anyway). The JSON records the thread count and load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers.generation.streamers import BaseStreamer

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import GenerationRequest, SamplingParams
from backends.torch.backend import TorchBackend
from benchmarks.common import QUESTIONS


class _TimingStreamer(BaseStreamer):
    """Records when each new token arrives from model.generate (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        if value.is_cuda:  # the token exists only once the GPU has produced it
            torch.cuda.synchronize(value.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def run_plain(backend: TorchBackend, prompt_ids: list[int], new_tokens: int) -> dict:
    model = backend.model
    ids = torch.tensor([prompt_ids], device=backend.device)
    streamer = _TimingStreamer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=streamer,
        )
    wall = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return {"tokens": n, "wall_s": wall, "decode_tps": _decode_rate(streamer.times), "aggregate_tps": n / wall}


def run_backend(backend: TorchBackend, prompts: list[list[dict]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens)
    requests = [GenerationRequest(messages=m, sampling=params) for m in prompts]
    times: list[list[float]] = [[] for _ in requests]
    t0 = time.perf_counter()
    streams = [backend.generate(r) for r in requests]

    def read(i: int) -> None:
        for chunk in streams[i]:
            if chunk.token_ids:
                times[i].append(time.perf_counter())

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(len(t) for t in times)
    decode_span = max(t[-1] for t in times) - min(t[0] for t in times)
    decode_tokens = sum(len(t) - 1 for t in times)
    return {
        "tokens": total,
        "wall_s": wall,
        "decode_tps_per_stream": statistics.median(_decode_rate(t) for t in times),
        "decode_tps": decode_tokens / decode_span if decode_span > 0 else float("nan"),
        "aggregate_tps": total / wall,
        "ttft_s_median": statistics.median(t[0] - t0 for t in times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default', an HF folder, a .gguf or a cached hub id")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "torch_batching.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from plugin.models.resolve import resolve_model

    model = resolve_model(args.model)
    backend = TorchBackend(
        model.path,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=max(args.streams, 1),
        num_threads=args.threads,
    )
    backend.load()
    backend.eos_ids = frozenset()  # fixed-length runs: compare equal work
    caps = backend.capabilities()
    prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.streams)]
    one = prompts[:1]
    one_ids = backend.prompt_ids(GenerationRequest(messages=one[0]))

    # warm-up (allocator, kernels, lazy init)
    run_plain(backend, one_ids, 8)
    run_backend(backend, prompts, 8)

    runs: dict[str, list[dict]] = {"plain_generate_b1": [], "backend_b1": [], f"backend_b{args.streams}": []}
    with Progress() as progress:
        task = progress.add_task("benchmark", total=args.repeats * 3)
        for _ in range(args.repeats):
            runs["plain_generate_b1"].append(run_plain(backend, one_ids, args.new_tokens))
            progress.advance(task)
            runs["backend_b1"].append(run_backend(backend, one, args.new_tokens))
            progress.advance(task)
            runs[f"backend_b{args.streams}"].append(run_backend(backend, prompts, args.new_tokens))
            progress.advance(task)
    backend.unload()

    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("decode_tps", "aggregate_tps", "wall_s")}
        for name, rs in runs.items()
    }
    b1 = med["backend_b1"]
    bn = med[f"backend_b{args.streams}"]
    plain = med["plain_generate_b1"]
    summary = {
        "batch1_decode_vs_plain_generate": b1["decode_tps"] / plain["decode_tps"],
        f"batch{args.streams}_aggregate_vs_batch1": bn["aggregate_tps"] / b1["aggregate_tps"],
        f"batch{args.streams}_decode_vs_batch1": bn["decode_tps"] / b1["decode_tps"],
    }
    table = Table(title=f"torch backend on {caps.provider} ({caps.precision}), {model.profile.name}")
    for col in ("run", "decode tok/s (median)", "aggregate tok/s incl. prefill", "wall s"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for name, m in med.items():
        table.add_row(name, f"{m['decode_tps']:.1f}", f"{m['aggregate_tps']:.1f}", f"{m['wall_s']:.2f}")
    console = Console()
    console.print(table)
    for k, v in summary.items():
        console.print(f"{k}: {v:.2f}x")
    console.print(f"load average (1, 5, 15 min): {os.getloadavg()}; other processes share these cores")

    result = {
        "model": model.profile.name,
        "device": caps.device,
        "provider": caps.provider,
        "precision": caps.precision,
        "simulated": caps.simulated,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": list(os.getloadavg()),
        "gpu": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else None,
        "streams": args.streams,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "medians": med,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
