"""Our default int4 export side by side with llama.cpp (and the plain export, and transformers) on one machine.

    python benchmarks/bench_vs_llamacpp.py [--runs 5] [--new-tokens 128] [--threads 2] [--engines ...]

Same model (the default SmolLM2-135M-Instruct: the GGUF it ships as, and our exports of it), the same
chat-prompt token ids fed to every engine, greedy, batch 1, a fixed number of new tokens (EOS suppressed
so every engine decodes the same count). Each engine runs in its own process, loads once, warms up once,
then the runs alternate between engines (round-robin, order rotated each round) so background load on
the shared machine hits all of them alike; medians are reported with every run kept in the JSON.

- TTFT: from handing over the prompt ids until the first new token id is known (prefill + first pick).
- decode tok/s: the remaining new tokens / the time they took (prefill excluded).
- peak RSS: the engine process's maximum resident set (VmHWM) after all its runs.
- on disk: the model files the engine reads.

`--compute-variants` adds copies of the default export whose 4-bit MatMulNBits run at other accuracy
levels (the lean preset's fp32-compute MLP, gate/up or down alone, everywhere), each with its top-1
agreement with torch, and the default export without the serving side's release of weight pages: the
speed / resident-memory trade behind the default (docs/fused-export.md). Every onnxruntime-genai engine
gives back the weight-file pages onnxruntime keeps mapped after load, as the serving backend does
(backends/ort_genai/resident.py).

Engines: `fused` (our default int4 export, onnxruntime-genai, CPU provider), `plain` (the Optimum graph +
MatMulNBits int4), `llamacpp` (llama-cpp-python on the original Q4_1 GGUF; optional extra `llamacpp`,
skipped with a note when not installed), `torch-fp32` / `torch-bf16` (transformers eager generate).
Writes benchmarks/results/vs_llamacpp.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ENGINES = ("llamacpp", "fused", "plain", "torch-fp32", "torch-bf16")
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer in full sentences."},
    {
        "role": "user",
        "content": "Write a short story about a lighthouse keeper who finds a message in a bottle, "
        "and explain what the message says and what the keeper decides to do about it.",
    },
]
SETTLE_S = 0.5
# Goals from the issue: decode >= 1.0x llama.cpp (stretch 1.2x), TTFT <= llama.cpp's, peak RSS <= 1.3x.
GOALS = {"decode_ratio_min": 1.0, "decode_ratio_stretch": 1.2, "ttft_ratio_max": 1.0, "rss_ratio_max": 1.3}


# ----------------------------------------------------------------------------------------------- workers
class _OgEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        import onnxruntime_genai as og

        config = og.Config(spec["folder"])
        config.clear_providers()  # the CPU provider: named as such in the results, never as NPU
        opts = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.og, self.model = og, og.Model(config)
        self.provider = "onnxruntime-genai CPUExecutionProvider"
        if spec.get("release_pages", True):  # as the serving backend does after load (backends/ort_genai/resident.py)
            from backends.ort_genai.resident import release_weight_pages

            release_weight_pages(sorted(Path(spec["folder"]).glob("*.data")))

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, [int(t) for t in gen.get_sequence(0)][len(ids) :]


class _LlamaCppEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        from llama_cpp import Llama

        t = spec["threads"]
        self.llm = Llama(spec["gguf"], n_ctx=512, n_batch=512, n_threads=t, n_threads_batch=t, verbose=False, seed=0)
        self.provider = "llama.cpp CPU"

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        self.llm.reset()  # no prompt-prefix reuse between runs: every run prefills
        out: list[int] = []
        t0 = time.perf_counter()
        t1 = t0
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            out.append(int(tok))
            if len(out) == 1:
                t1 = time.perf_counter()
            if len(out) == new_tokens:
                break
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out


class _TorchEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        dtype = torch.bfloat16 if spec["engine"] == "torch-bf16" else torch.float32
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=dtype).eval()
        self.provider = f"transformers eager CPU {str(dtype).removeprefix('torch.')}"

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value: Any) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        inp = self.torch.tensor([ids])
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.model.generate(
                inp,
                attention_mask=self.torch.ones_like(inp),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=Clock(),
                pad_token_id=self.model.generation_config.eos_token_id,
            )
        # put() #0 is the prompt, #1 the first new token, the last one the final token
        return stamps[1] - t0, stamps[-1] - stamps[1], out[0, len(ids) :].tolist()


def worker(spec: dict[str, Any]) -> None:
    """Child process: load one engine, warm up, then answer `run` lines with one measurement each."""
    started = time.perf_counter()
    kind = spec["engine"]
    engine: Any
    if kind == "llamacpp":
        engine = _LlamaCppEngine(spec)
    elif kind.startswith("torch"):
        engine = _TorchEngine(spec)
    else:
        engine = _OgEngine(spec)
    load_s = time.perf_counter() - started
    engine.run(spec["ids"], spec["new_tokens"])  # warm-up
    print(json.dumps({"ready": True, "load_s": round(load_s, 2), "provider": engine.provider}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        ttft, decode, tokens = engine.run(spec["ids"], spec["new_tokens"])
        n = len(tokens)
        print(json.dumps({"ttft_ms": ttft * 1000, "decode_tps": (n - 1) / decode, "tokens": tokens}), flush=True)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set, MB (MiB).

    /proc/self/status VmHWM is the high-water mark of this process image only; ru_maxrss would also count
    the parent's memory, which Linux carries into a child across fork + exec.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


# ----------------------------------------------------------------------------------------------- parent
def _machine() -> dict[str, Any]:
    cpu, flags = platform.processor(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f" {f}" in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "simd": simd, "mem_gib": round(mem)}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "torch", "transformers", "optimum-onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _size_mb(paths: list[Path]) -> float:
    total = 0
    for p in paths:
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return round(total / 1e6, 1)


def _onnx_size(folder: Path) -> float:
    return _size_mb([folder / "model.onnx", folder / "model.onnx.data"])


def prepare(engines: list[str], threads: int, new_tokens: int) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """Export (through the cache), find the GGUF, tokenize the chat prompt; one spec per engine."""
    from transformers import AutoTokenizer

    from plugin.convert import export
    from plugin.models.resolve import default_model_gguf, resolve_model

    source = Path(resolve_model("default").path)
    tok = AutoTokenizer.from_pretrained(source)
    ids = [int(i) for i in tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)]
    base = {"threads": threads, "new_tokens": new_tokens, "ids": ids}
    specs: dict[str, dict[str, Any]] = {}
    for engine in engines:
        spec = {**base, "engine": engine}
        if engine in ("fused", "plain"):
            exported = export("default", target="cpu", precision="int4", graph=engine, progress=True)
            if exported.manifest.get("graph", {}).get("built") != engine:
                raise SystemExit(f"export built {exported.manifest.get('graph')} for graph={engine}")
            spec.update(folder=str(exported.path), disk_mb=_onnx_size(exported.path), key=exported.key)
            spec["quantization"] = exported.manifest.get("quantization", {}).get("method")
            spec["top1_agreement"] = exported.manifest.get("parity", {}).get("top1_agreement")
            spec["graph"] = engine
        elif engine == "llamacpp":
            gguf = default_model_gguf()
            spec.update(gguf=str(gguf), disk_mb=_size_mb([gguf]))
        else:
            spec.update(source=str(source), disk_mb=_size_mb(sorted(source.glob("*.safetensors"))))
        specs[engine] = spec
    return ids, specs


# label -> MatMulNBits name parts run at fp32 compute (accuracy level 0); every other 4-bit one at level 4
COMPUTE_VARIANTS: dict[str, tuple[str, ...]] = {
    "lean preset: fp32 compute in the MLP": ("gate_up_proj", "down_proj"),
    "fp32 compute: gate/up": ("gate_up_proj",),
    "fp32 compute: down": ("down_proj",),
    "fp32 compute everywhere": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def compute_variants(folder: Path, work: Path) -> dict[str, Path]:
    """Copies of an int4 export (hard links; model.onnx rewritten) with other accuracy levels, by label."""
    import onnx

    from plugin.convert.fused_memory import set_fp32_compute

    out: dict[str, Path] = {}
    for i, (label, parts) in enumerate(COMPUTE_VARIANTS.items()):
        target = work / f"variant{i}"
        target.mkdir(parents=True)
        for f in folder.iterdir():
            if f.is_file() and f.name != "model.onnx":
                os.link(f, target / f.name)
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for node in model.graph.node:
            attrs = {a.name: a for a in node.attribute}
            if node.op_type == "MatMulNBits" and attrs["bits"].i == 4:
                attrs["accuracy_level"].i = 4
        set_fp32_compute(model, parts)
        onnx.save_model(model, str(target / "model.onnx"))
        out[label] = target
    return out


def agreement(folder: Path, source: Path) -> float | None:
    from plugin.convert.parity import run_parity

    return run_parity(folder, source, "int4").top1_agreement


def _start(spec: dict[str, Any]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    return proc


def _read(proc: subprocess.Popen, engine: str) -> dict[str, Any]:
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        raise RuntimeError(f"the {engine} worker exited (code {proc.wait()}); see its output above")
    return json.loads(line)


def run_all(specs: dict[str, dict[str, Any]], runs: int) -> dict[str, dict[str, Any]]:
    """Start every worker (one at a time, so loads do not overlap), then alternate runs across them."""
    procs: dict[str, subprocess.Popen] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for engine, spec in specs.items():
            procs[engine] = _start(spec)
            ready = _read(procs[engine], engine)
            results[engine] = {"load_s": ready["load_s"], "provider": ready["provider"], "runs": []}
        order = list(specs)
        for r in range(runs):
            for engine in order[r % len(order) :] + order[: r % len(order)]:
                time.sleep(SETTLE_S)  # let the previous engine's spinning worker threads go idle
                procs[engine].stdin.write("run\n")  # type: ignore[union-attr]
                procs[engine].stdin.flush()  # type: ignore[union-attr]
                results[engine]["runs"].append(_read(procs[engine], engine))
        for engine, proc in procs.items():
            proc.stdin.write("quit\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            results[engine].update(_read(proc, engine))
            proc.wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def summarize(specs: dict[str, dict[str, Any]], raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for engine, res in raw.items():
        runs = res["runs"]
        rows[engine] = {
            "provider": res["provider"],
            "decode_tps": round(statistics.median(r["decode_tps"] for r in runs), 1),
            "decode_tps_range": [
                round(min(r["decode_tps"] for r in runs), 1),
                round(max(r["decode_tps"] for r in runs), 1),
            ],
            "ttft_ms": round(statistics.median(r["ttft_ms"] for r in runs), 1),
            "ttft_ms_range": [round(min(r["ttft_ms"] for r in runs), 1), round(max(r["ttft_ms"] for r in runs), 1)],
            "peak_rss_mb": res["peak_rss_mb"],
            "disk_mb": specs[engine]["disk_mb"],
            "top1_agreement": specs[engine].get("top1_agreement"),
            "export_key": specs[engine].get("key"),
            "quantization": specs[engine].get("quantization"),
            "load_s": res["load_s"],
            "new_tokens": len(runs[0]["tokens"]),
            "first_tokens": runs[0]["tokens"][:16],
            "runs": [{k: round(v, 2) for k, v in r.items() if k != "tokens"} for r in runs],
        }
    return rows


def goals(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if "fused" not in rows or "llamacpp" not in rows:
        return None
    ours, ref = rows["fused"], rows["llamacpp"]
    decode = ours["decode_tps"] / ref["decode_tps"]
    ttft = ours["ttft_ms"] / ref["ttft_ms"]
    rss = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    return {
        "decode_ratio": round(decode, 2),
        "ttft_ratio": round(ttft, 2),
        "rss_ratio": round(rss, 2),
        "decode_goal_met": decode >= GOALS["decode_ratio_min"],
        "decode_stretch_met": decode >= GOALS["decode_ratio_stretch"],
        "ttft_goal_met": ttft <= GOALS["ttft_ratio_max"],
        "rss_goal_met": rss <= GOALS["rss_ratio_max"],
        "goals": GOALS,
    }


LABELS = {
    "llamacpp": "llama.cpp, Q4_1 GGUF",
    "fused": "ours: fused int4 export",
    "plain": "plain Optimum int4 export",
    "torch-fp32": "transformers fp32",
    "torch-bf16": "transformers bf16",
}


def print_table(rows: dict[str, dict[str, Any]], summary: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Side by side, one run, alternating (medians)")
    for col in ("engine", "runs on", "decode tok/s", "TTFT ms", "peak RSS MB", "on disk MB", "top-1 vs torch"):
        table.add_column(col)
    for engine, r in rows.items():
        table.add_row(
            LABELS.get(engine, engine),
            r["provider"],
            f"{r['decode_tps']} ({r['decode_tps_range'][0]}–{r['decode_tps_range'][1]})",
            f"{r['ttft_ms']} ({r['ttft_ms_range'][0]}–{r['ttft_ms_range'][1]})",
            str(r["peak_rss_mb"]),
            str(r["disk_mb"]),
            "–" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}",
        )
    console = Console()
    console.print(table)
    if summary:
        console.print(
            f"fused vs llama.cpp: decode {summary['decode_ratio']}x, TTFT {summary['ttft_ratio']}x, "
            f"peak RSS {summary['rss_ratio']}x"
        )


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(rows)
    names = [LABELS.get(e, e) for e in engines]
    colors = ["#d62728" if e == "fused" else "#1f77b4" if e == "llamacpp" else "#7f7f7f" for e in engines]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in zip(
        axes,
        ("decode_tps", "ttft_ms", "peak_rss_mb"),
        (
            "decode tokens/s (higher is better)",
            "time to first token, ms (lower is better)",
            "peak RSS, MB (lower is better)",
        ),
        strict=True,
    ):
        values = [rows[e][key] for e in engines]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:g}", va="center", fontsize=8)
        ax.margins(x=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument(
        "--extra-folder",
        action="append",
        default=[],
        metavar="LABEL=FOLDER",
        help="also run another onnxruntime-genai folder (e.g. a candidate graph) under LABEL",
    )
    parser.add_argument(
        "--compute-variants",
        action="store_true",
        help="also run the default export at other MatMulNBits accuracy levels (writes vs_llamacpp_compute.json)",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/vs_llamacpp.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.runs < 1 or args.new_tokens < 2 or args.threads < 1:
        parser.error("--runs >= 1, --new-tokens >= 2 and --threads >= 1 are needed")
    if args.out is None:
        args.out = RESULTS / ("vs_llamacpp_compute.json" if args.compute_variants else "vs_llamacpp.json")
    if args.compute_variants and "fused" not in args.engines:
        parser.error("--compute-variants rewrites the fused export: keep 'fused' in --engines")

    engines = list(dict.fromkeys(args.engines))
    notes = []
    if "llamacpp" in engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            engines.remove("llamacpp")
            notes.append("llama-cpp-python is not installed (pip install -e .[llamacpp]); llama.cpp skipped")
            print(notes[-1], file=sys.stderr)
    load_before = os.getloadavg()
    ids, specs = prepare(engines, args.threads, args.new_tokens)
    for item in args.extra_folder:
        label, _, folder = item.partition("=")
        if not label or not (Path(folder) / "genai_config.json").is_file():
            parser.error(f"--extra-folder {item!r}: give LABEL=FOLDER, a folder holding genai_config.json")
        spec = {**specs[next(iter(specs))], "engine": label, "folder": folder, "disk_mb": _onnx_size(Path(folder))}
        spec.update(key=None, quantization=None, top1_agreement=None)
        specs[label] = spec
    with tempfile.TemporaryDirectory(prefix="accelserve-variants-") as work:
        if args.compute_variants:
            from plugin.models.resolve import resolve_model

            source = Path(resolve_model("default").path)
            for label, folder in compute_variants(Path(specs["fused"]["folder"]), Path(work)).items():
                spec = {**specs["fused"], "engine": label, "folder": str(folder), "key": None}
                spec["top1_agreement"] = agreement(folder, source)
                specs[label] = spec
            kept = "fused, weight pages kept mapped"  # the default export without the serving side's page release
            specs[kept] = {**specs["fused"], "engine": kept, "release_pages": False}
        raw = run_all(specs, args.runs)
    rows = summarize(specs, raw)
    summary = goals(rows)
    result = {
        "benchmark": "bench_vs_llamacpp",
        "model": "SmolLM2-135M-Instruct (default)",
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "threads": args.threads,
        "method": "each engine in its own process, loaded once, one warm-up run, runs alternate round-robin; "
        "greedy, batch 1, EOS suppressed; medians",
        "machine": _machine(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(),
        "rows": rows,
        "fused_vs_llamacpp": summary,
        "notes": notes,
        "created_unix": int(time.time()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    title = (
        f"SmolLM2-135M-Instruct, {len(ids)}-token chat prompt, {args.new_tokens} new tokens, greedy, batch 1, "
        f"{args.threads} threads — {result['machine']['cpu']} ({result['machine']['cpus']} cores)"
    )
    plot(rows, args.out.with_suffix(".png"), title)
    print_table(rows, summary)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
