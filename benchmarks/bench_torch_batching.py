"""Throughput of the torch backend's continuous batching at 1/4/8/16 streams, against plain `model.generate`
and, side by side in the same run, against another version of the backend (`--baseline-src`).

Each repeat runs one worker process per implementation (alternating which goes first), on the same model:
  1. plain `model.generate` (batch 1, greedy, SDPA), tokens timed with a streamer;
  2. TorchBackend with N concurrent streams for each N in `--streams` (different prompts, submitted together);
  3. an audit of one steady decode step at the largest N (benchmarks/step_audit.py): host syncs, uploads and
     aten ops outside the model's forward;
  4. the streams at N = 8 again beside a request with temperature=1e-39: how many produce the same tokens;
  5. on CUDA only, transformers' own continuous batching (`model.generate_batch`, paged attention,
     `attn_implementation="sdpa_paged"`) on the same prompts at each N, side by side in the table. On the CPU it
     is recorded as not measured: transformers 4.57's continuous batching probes CUDA memory and fails there.
Every run generates exactly `--new-tokens` tokens (EOS is ignored) so the rates compare like with like.
Decode rate = (tokens - 1) / (last token time - first token time) per stream; aggregate rate = all new
tokens / wall time from submission to the last token (includes prefill). Medians over the repeats.
`--sampling` gives every stream temperature 0.8, top-k 50, top-p 0.95, repetition penalty 1.1 and its own
seed (the per-row sampling path); the default is greedy.

Runs on CUDA when torch sees a GPU (the numbers are then GPU numbers and labelled so), else on the CPU;
`--device cuda:N` pins a GPU (the backend checks it exists, picks bf16 only at compute capability >= 8.0 of
that GPU, and its runner thread sets that device), `--dtype` overrides the precision.
Usage: python benchmarks/bench_torch_batching.py [--model default] [--device auto|cpu|cuda:N] [--dtype auto]
       [--streams 1,4,8,16] [--repeats 3] [--threads 1] [--sampling] [--baseline-src DIR]
`--baseline-src DIR` is a folder holding another version's `backends` package (for example
`git archive <commit> backends | tar -x -C DIR`); its workers import the backend from there.

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
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers.generation.streamers import BaseStreamer

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))


def _baseline_first() -> None:
    """A worker for another version puts that version's `backends` package ahead of this checkout's."""
    if "--worker" in sys.argv and "--src" in sys.argv:
        src = sys.argv[sys.argv.index("--src") + 1]
        if src:
            sys.path.insert(0, str(Path(src).resolve()))


_baseline_first()

from backends.base import GenerationRequest, SamplingParams  # noqa: E402
from backends.torch.backend import TorchBackend  # noqa: E402
from benchmarks.common import QUESTIONS  # noqa: E402


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
    """Plain `model.generate` at batch 1: the reference the backend's single stream should match."""
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


def sampling_params(new_tokens: int, sampling: bool, seed: int) -> SamplingParams:
    if not sampling:
        return SamplingParams(max_new_tokens=new_tokens)
    return SamplingParams(
        max_new_tokens=new_tokens, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=seed
    )


def run_backend(backend: TorchBackend, prompts: list[list[dict]], new_tokens: int, sampling: bool = False) -> dict:
    """N concurrent streams submitted together; per-stream decode rates, aggregate rate, and every stream's ids."""
    requests = [
        GenerationRequest(messages=m, sampling=sampling_params(new_tokens, sampling, seed=i))
        for i, m in enumerate(prompts)
    ]
    times: list[list[float]] = [[] for _ in requests]
    ids: list[list[int]] = [[] for _ in requests]
    t0 = time.perf_counter()
    streams = [backend.generate(r) for r in requests]

    def read(i: int) -> None:
        for chunk in streams[i]:
            if chunk.token_ids:
                times[i].append(time.perf_counter())
                ids[i].extend(chunk.token_ids)

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
        "ids": ids,
    }


def audit(backend: TorchBackend, prompts: list[list[dict]], sampling: bool) -> dict[str, float]:
    """Host syncs, uploads and aten ops of one steady decode step with len(prompts) rows (step_audit.py)."""
    from backends.torch import batching
    from benchmarks.step_audit import admitted_runner, audit_steps

    encoder = backend._encoder
    works = []
    for i, m in enumerate(prompts):
        request = GenerationRequest(messages=m, sampling=sampling_params(1000, sampling, seed=i))
        ids = backend.prompt_ids(request)
        works.append(
            batching.make_work(f"audit{i}", ids, request.sampling, frozenset(), encoder.decoder(ids), backend.device)
        )
    runner = admitted_runner(batching, backend.model, backend.device, works)
    with torch.inference_mode():
        runner._step()  # warm
    return audit_steps(runner, 8)


def poison_check(backend: TorchBackend, prompts: list[list[dict]], reference: list[list[int]], args: Any) -> dict:
    """The streams of `reference` again, beside one more request with temperature=1e-39 (valid, and once
    enough to kill the batching thread): how many of the others produce exactly the same tokens."""
    n = len(prompts)
    requests = [
        GenerationRequest(messages=m, sampling=sampling_params(args.new_tokens, args.sampling, seed=i))
        for i, m in enumerate(prompts)
    ]
    poison = SamplingParams(max_new_tokens=args.new_tokens, temperature=1e-39, top_p=0.9, seed=99)
    requests.append(
        GenerationRequest(messages=[{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}], sampling=poison)
    )
    results: list[list[Any]] = [[] for _ in requests]
    try:
        streams = [backend.generate(r) for r in requests]
    except Exception as e:  # a runner that died refuses new work
        return {"others": n, "others_unchanged": 0, "error": f"{type(e).__name__}: {e}"}

    def read(i: int) -> None:
        results[i] = list(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.perf_counter() + 5
    while (
        backend.health().healthy
        and time.perf_counter() < deadline
        and any(chunks and chunks[-1].finish_reason == "error" for chunks in results[:n])
    ):
        time.sleep(0.05)  # a runner that is dying ends its streams just before its thread exits
    ids = [[t for c in chunks for t in c.token_ids] for chunks in results]
    last = [chunks[-1] if chunks else None for chunks in results]
    return {
        "others": n,
        "others_unchanged": sum(ids[i] == reference[i] for i in range(n)),
        "others_failed": sum(1 for c in last[:n] if c is None or c.finish_reason == "error"),
        "poisoned_finish": last[n].finish_reason if last[n] else None,
        "poisoned_error": last[n].error if last[n] else None,
        "healthy_after": backend.health().healthy,
    }


CB_NOT_ON_CPU = (
    "not measured: transformers 4.57's continuous batching (generate_batch) probes CUDA memory and fails on the "
    "CPU; run this script on a GPU (--device cuda:N) to compare it side by side"
)


def run_transformers_cb(backend: TorchBackend, prompt_ids: list[list[int]], counts: list[int], args: Any) -> dict:
    """transformers' own continuous batching (paged attention) on the same prompts, CUDA only: aggregate tok/s
    at each stream count (wall time of one `generate_batch` call of N prompts), greedy, fixed length."""
    if backend.device.type != "cuda":
        return {"skipped": CB_NOT_ON_CPU}
    from transformers import AutoModelForCausalLM, GenerationConfig

    kwargs: dict[str, Any] = {"gguf_file": backend.gguf_file} if backend.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            backend.folder,
            dtype=backend.model.dtype,
            attn_implementation="sdpa_paged",
            device_map={"": backend.device},
            **kwargs,
        ).eval()
        config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
        model.generate_batch(inputs=prompt_ids[:1], generation_config=config, progress_bar=False)  # warm-up
        out: dict[str, Any] = {"attn_implementation": "sdpa_paged", "streams": {}}
        for n in counts:
            torch.cuda.synchronize(backend.device)
            t0 = time.perf_counter()
            results = model.generate_batch(inputs=prompt_ids[:n], generation_config=config, progress_bar=False)
            torch.cuda.synchronize(backend.device)
            wall = time.perf_counter() - t0
            tokens = sum(len(r.generated_tokens) for r in results.values())
            failed = sum(1 for r in results.values() if r.error) + n - len(results)
            rate = tokens / wall
            out["streams"][str(n)] = {"tokens": tokens, "wall_s": wall, "aggregate_tps": rate, "failed": failed}
        del model
        torch.cuda.empty_cache()
        return out
    except Exception as e:  # recorded in the results: the comparison says why it could not run
        return {"error": f"{type(e).__name__}: {e}"}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One repeat of every measurement for the implementation importable now (this checkout or --src)."""
    from plugin.models.resolve import resolve_model

    counts = [int(n) for n in args.streams.split(",")]
    model = resolve_model(args.model)
    backend = TorchBackend(
        model.path, device=args.device, dtype=args.dtype, max_batch_size=max(counts), num_threads=args.threads
    )
    backend.load()
    backend.eos_ids = frozenset()  # fixed-length runs: compare equal work
    caps = backend.capabilities()
    prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(max(counts))]
    one_ids = backend.prompt_ids(GenerationRequest(messages=prompts[0]))
    run_plain(backend, one_ids, 8)  # warm-up (allocator, kernels, lazy init)
    run_backend(backend, prompts[: max(counts)], 8, args.sampling)
    out: dict[str, Any] = {
        "source": "baseline" if args.src else "this checkout",
        "provider": caps.provider,
        "device": caps.device,
        "precision": caps.precision,
        "simulated": caps.simulated,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else None,
        "model": model.profile.name,
        "plain_generate_b1": run_plain(backend, one_ids, args.new_tokens),
        "streams": {},
    }
    for n in counts:
        out["streams"][str(n)] = run_backend(backend, prompts[:n], args.new_tokens, args.sampling)
    out["audit"] = audit(backend, prompts[: max(counts)], args.sampling)
    n = max(c for c in counts if c <= 8)  # last: in an older version the poisoned request may kill the runner
    out["poison"] = poison_check(backend, prompts[:n], out["streams"][str(n)]["ids"], args)
    if not args.src:  # once per repeat: it does not depend on which version of our backend runs
        all_ids = [backend.prompt_ids(GenerationRequest(messages=m)) for m in prompts]
        out["transformers_cb"] = run_transformers_cb(backend, all_ids, counts, args)
    backend.unload()
    return out


def _spawn(args: argparse.Namespace, src: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--src", src, "--worker-out", str(out)]
    for flag in ("model", "device", "dtype", "streams", "new_tokens", "threads"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    if args.sampling:
        cmd.append("--sampling")
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default', an HF folder, a .gguf or a cached hub id")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--streams", default="1,4,8,16", help="comma-separated stream counts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--sampling", action="store_true", help="sampled streams instead of greedy")
    ap.add_argument("--baseline-src", default=None, help="folder with another version's backends package")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "torch_batching.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        args.worker_out.write_text(json.dumps(worker(args)))
        return

    impls = {"current": ""}
    if args.baseline_src:
        impls = {"baseline": str(Path(args.baseline_src).resolve()), "current": ""}
    runs: dict[str, list[dict]] = {name: [] for name in impls}
    scratch = args.out.with_suffix(".worker.json")
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with Progress() as progress:
        task = progress.add_task("benchmark", total=args.repeats * len(impls))
        for r in range(args.repeats):
            order = list(impls) if r % 2 == 0 else list(reversed(impls))  # alternate who runs first
            for name in order:
                runs[name].append(_spawn(args, impls[name], scratch))
                progress.advance(task)
    scratch.unlink(missing_ok=True)
    counts = args.streams.split(",")
    first = runs["current"][0]
    med: dict[str, Any] = {}
    for name, rs in runs.items():
        med[name] = {
            "plain_generate_b1_decode_tps": statistics.median(r["plain_generate_b1"]["decode_tps"] for r in rs),
            "aggregate_tps": {n: statistics.median(r["streams"][n]["aggregate_tps"] for r in rs) for n in counts},
            # the same worker's plain model.generate rate, measured minutes apart at most: on a shared machine
            # this ratio moves less with the load than the raw rate does
            "aggregate_vs_plain_generate": {
                n: statistics.median(
                    r["streams"][n]["aggregate_tps"] / r["plain_generate_b1"]["decode_tps"] for r in rs
                )
                for n in counts
            },
            "decode_tps": {n: statistics.median(r["streams"][n]["decode_tps"] for r in rs) for n in counts},
            "audit": rs[0]["audit"],
        }
    # greedy streams must be the same tokens whichever implementation ran them
    same_ids = None
    if "baseline" in runs and not args.sampling:
        same_ids = all(
            runs["baseline"][0]["streams"][n]["ids"] == runs["current"][0]["streams"][n]["ids"] for n in counts
        )
    kind = "sampled" if args.sampling else "greedy"
    title = f"torch backend on {first['provider']} ({first['precision']}), {first['model']}, {kind}, aggregate tok/s"
    table = Table(title=title)
    table.add_column("implementation")
    for n in counts:
        table.add_column(f"{n} stream{'s' if n != '1' else ''}", justify="right")
    table.add_column("host syncs / step (+ in model)", justify="right")
    table.add_column("uploads / step", justify="right")
    table.add_column("ops / step", justify="right")
    for name, m in med.items():
        a = m["audit"]
        table.add_row(
            name,
            *(f"{m['aggregate_tps'][n]:.1f}" for n in counts),
            f"{a['host_syncs']:.0f} (+{a.get('host_syncs_in_model', float('nan')):.0f})",
            f"{a['uploads']:.0f}",
            f"{a['ops']:.0f}",
        )
    cb_runs = [r["transformers_cb"] for r in runs["current"] if "transformers_cb" in r]
    cb_measured = [r for r in cb_runs if "streams" in r]
    if cb_measured:
        cb_rates = {n: statistics.median(r["streams"][n]["aggregate_tps"] for r in cb_measured) for n in counts}
        med["transformers_generate_batch"] = {"aggregate_tps": cb_rates}
        table.add_row(
            "transformers generate_batch (paged)",
            *(f"{med['transformers_generate_batch']['aggregate_tps'][n]:.1f}" for n in counts),
            "-",
            "-",
            "-",
        )
    ratios = Table(title="aggregate tok/s / the same worker's plain model.generate batch-1 decode tok/s (medians)")
    ratios.add_column("implementation")
    for n in counts:
        ratios.add_column(f"{n} stream{'s' if n != '1' else ''}", justify="right")
    for name, m in med.items():
        if "aggregate_vs_plain_generate" in m:
            ratios.add_row(name, *(f"{m['aggregate_vs_plain_generate'][n]:.2f}" for n in counts))
    console = Console(width=120)
    console.print(table)
    console.print(ratios)
    for name, m in med.items():
        if "plain_generate_b1_decode_tps" in m:
            console.print(f"{name}: plain model.generate batch 1 decode {m['plain_generate_b1_decode_tps']:.1f} tok/s")
    cb_note = next((r.get("error") or r.get("skipped") for r in cb_runs if "streams" not in r), None)
    if cb_note:
        console.print(f"transformers generate_batch: {cb_note}")
    if same_ids is not None:
        console.print(f"greedy token ids identical across implementations: {same_ids}")
    for name, rs in runs.items():
        for r in rs:
            p = r["poison"]
            console.print(
                f"{name}: beside a temperature=1e-39 request, {p['others_unchanged']}/{p['others']} streams unchanged, "
                f"{p.get('others_failed', '-')} failed; poisoned request: {p.get('poisoned_finish')} "
                f"({p.get('poisoned_error') or p.get('error') or 'no error'}); healthy after: {p.get('healthy_after')}"
            )
    console.print(f"load average (1, 5, 15 min): {os.getloadavg()}; other processes share these cores")
    for rs in runs.values():
        for r in rs:
            for s in r["streams"].values():
                s.pop("ids", None)
    result = {
        "model": first["model"],
        "device": first["device"],
        "provider": first["provider"],
        "precision": first["precision"],
        "simulated": first["simulated"],
        "gpu": first["gpu"],
        "torch_threads": first["torch_threads"],
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": list(os.getloadavg()),
        "sampling": args.sampling,
        "streams": [int(n) for n in counts],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "implementations": {name: ("--baseline-src" if src else "this checkout") for name, src in impls.items()},
        "greedy_ids_identical": same_ids,
        "transformers_generate_batch": cb_measured[0] if cb_measured else (cb_runs[0] if cb_runs else None),
        "medians": med,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
