"""Peak resident memory of a whole serving process: the engine with the default int4 onnxruntime-genai backend.

    python benchmarks/rss_serving.py [--new-tokens 32] [--threads 2]

Each configuration runs in its own fresh process (VmHWM: the high-water mark of that process alone):
- `engine`: `Engine` on the default model with one simulated NPU (the int4 onnxruntime-genai export on the
  CPU provider), loads, answers one chat request; tokenizer as served (backends/hf_tokenizer.py); malloc
  arenas capped as the CLI caps them (plugin/serve/malloc_arenas.py).
- `engine-transformers`: the same, with the prompt encoder forced onto transformers' AutoTokenizer (the
  serving path before issue 17's tokenizer change): the cost of importing transformers, hence torch.
- `backend` / `backend-transformers`: the same two tokenizers with the backend alone (OrtGenaiBackend on the
  int4 export folder, one chat request, no Engine and no model resolution): the serving backend's own cost.
- `llamacpp`: llama-cpp-python on the default model's original GGUF, the same chat rendered by its own
  chat handler (the issue's anchor; skipped with a note when the `llamacpp` extra is not installed).
Reports peak RSS (MiB), whether torch / transformers are in sys.modules after the reply, and the ratio to
llama.cpp. Writes benchmarks/results/rss_serving.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_vs_llamacpp import MESSAGES, peak_rss_mb

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("engine", "engine-transformers", "backend", "backend-transformers", "llamacpp")


def _force_transformers_tokenizer() -> None:
    """The serving path before the tokenizer change: every PromptEncoder through transformers' AutoTokenizer."""
    from backends.prompt import PromptEncoder

    original = PromptEncoder.from_folder.__func__

    def with_transformers(cls, folder, gguf_file=None, transformers=False):
        return original(cls, folder, gguf_file, transformers=True)

    PromptEncoder.from_folder = classmethod(with_transformers)


def _backend(folder: str, new_tokens: int) -> dict[str, Any]:
    from backends.base import GenerationRequest, SamplingParams
    from backends.ort_genai.backend import OrtGenaiBackend

    backend = OrtGenaiBackend(folder, device="npu", simulated=True)
    backend.load()
    request = GenerationRequest(messages=MESSAGES, sampling=SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    text = "".join(chunk.text for chunk in backend.generate(request))
    if not text:
        raise SystemExit("the backend answered with no text")
    caps = backend.capabilities()
    tokenizer = type(backend._encoder.tokenizer).__name__ if backend._encoder else "?"
    return {
        "backend": "onnxruntime-genai",
        "precision": caps.precision,
        "device": "npu (simulated)",
        "tokenizer": tokenizer,
    }


def _engine(new_tokens: int) -> dict[str, Any]:
    from plugin.engine.devices import parse_simulation
    from plugin.engine.engine import Engine
    from plugin.models.resolve import resolve_model

    with Engine(resolve_model("default"), devices=parse_simulation("npu:8GB")) as engine:
        reply = engine.chat(MESSAGES, max_new_tokens=new_tokens, temperature=0.0)
        tokenizer = type(engine.prompt_encoder().tokenizer).__name__
    p = reply.placement
    return {"backend": p.backend, "precision": p.precision, "device": p.device_id, "tokenizer": tokenizer}


def _llamacpp(new_tokens: int, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama

    from plugin.models.resolve import default_model_gguf

    llm = Llama(str(default_model_gguf()), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_chat_completion(MESSAGES, max_tokens=new_tokens, temperature=0.0)
    return {"backend": "llama.cpp", "precision": "Q4_1 (GGUF)", "device": "cpu", "tokenizer": "llama.cpp"}


def worker(config: str, new_tokens: int, threads: int, folder: str) -> None:
    """Child process: one configuration, one reply, then its peak RSS and which heavy modules it imported."""
    if config.endswith("-transformers"):
        _force_transformers_tokenizer()
    capped = False
    if config.startswith("engine"):  # as `accelserve serve` / `chat` start (plugin/serve/malloc_arenas.py)
        from plugin.serve.malloc_arenas import cap_malloc_arenas

        capped = cap_malloc_arenas()
    if config == "llamacpp":
        info = _llamacpp(new_tokens, threads)
    elif config.startswith("backend"):
        info = _backend(folder, new_tokens)
    else:
        info = _engine(new_tokens)
    info.update(
        config=config,
        peak_rss_mb=round(peak_rss_mb(), 1),
        torch_imported="torch" in sys.modules,
        transformers_imported="transformers" in sys.modules,
        malloc_arenas_capped=capped,
    )
    print("RESULT " + json.dumps(info), flush=True)


def run(config: str, new_tokens: int, threads: int, folder: str) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--worker", config, "--new-tokens", str(new_tokens), "--threads", str(threads)]
    cmd += ["--folder", folder]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        if config == "llamacpp" and "No module named 'llama_cpp'" in out.stderr:
            print("llamacpp: skipped (pip install -e '.[llamacpp]' to compare)")
            return None
        raise SystemExit(f"{config} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.new_tokens, args.threads, args.folder)
        return
    configs = [c.strip() for c in args.configs.split(",")]
    folder = ""
    if any(c.startswith("backend") for c in configs):  # the export the engine serves (a cache hit once built)
        from plugin.convert import export

        folder = str(export("default", target="cpu", precision="int4", progress=False).path)
    results = [r for c in configs if (r := run(c, args.new_tokens, args.threads, folder))]
    anchor = next((r["peak_rss_mb"] for r in results if r["config"] == "llamacpp"), None)
    print(f"{'config':<22}{'backend':<24}{'tokenizer':<22}{'peak RSS MiB':>13}{'vs llama.cpp':>14}  torch imported")
    for r in results:
        ratio = f"{r['peak_rss_mb'] / anchor:.2f}x" if anchor else "-"
        r["vs_llamacpp"] = round(r["peak_rss_mb"] / anchor, 3) if anchor else None
        backend = f"{r['backend']} {r['precision']}"
        row = f"{r['config']:<22}{backend:<24}{r['tokenizer']:<22}{r['peak_rss_mb']:>13.1f}{ratio:>14}"
        print(f"{row}  {r['torch_imported']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "rss_serving.json"
    out.write_text(json.dumps({"new_tokens": args.new_tokens, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
