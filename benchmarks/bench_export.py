"""Export the default model at each precision and measure: step times, folder size, decode tokens/s, parity.

    python benchmarks/bench_export.py [--model default] [--precisions int4 int8 fp32] [--tokens 64] [--force]

Prints a table and writes benchmarks/results/export.json. Decode speed is measured with a plain
onnxruntime-genai Generator on the CPU provider (the provider that really ran is reported), greedy, after
a short warm-up; prefill is timed separately and excluded from tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "export.json"
PROMPT = "<|im_start|>user\nWrite a short story about a robot learning to paint.<|im_end|>\n<|im_start|>assistant\n"


def _target(precision: str) -> str:
    return "gpu" if precision == "fp16" else "cpu"


def measure_decode(folder: Path, new_tokens: int, runs: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()  # this machine: CPU provider (named in the result, never called GPU/NPU)
    model = og.Model(config)
    tok = og.Tokenizer(model)
    ids = tok.encode(PROMPT)
    rates, prefills = [], []
    for i in range(runs + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < new_tokens:
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        prefills.append(t1 - t0)
        rates.append(n / (t2 - t1))
    return {
        "provider": "CPUExecutionProvider",
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "decode_tok_s": round(statistics.median(rates), 1),
        "prefill_s": round(statistics.median(prefills), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--precisions", nargs="+", default=["int4", "int8", "fp16", "fp32"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--force", action="store_true", help="rebuild (measures export time rather than a cache hit)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from plugin.convert import export

    rows = []
    for precision in args.precisions:
        t0 = time.perf_counter()
        exported = export(args.model, target=_target(precision), precision=precision, force=args.force)
        wall = time.perf_counter() - t0
        m = exported.manifest
        parity = m.get("parity") or {}
        rows.append(
            {
                "precision": precision,
                "target": exported.target,
                "key": exported.key,
                "cache_hit": exported.cache_hit,
                "export_wall_s": round(wall, 2),
                "timings_s": m.get("timings_s", {}),
                "size_mb": round(m.get("total_size_bytes", 0) / 1e6, 1),
                "quantization": m.get("quantization", {}).get("method"),
                "top1_agreement": parity.get("top1_agreement"),
                "greedy_match": f"{sum(parity.get('generation_match', []))}/{parity.get('prompts', 0)}",
                "max_logit_diff": parity.get("max_logit_diff"),
                **measure_decode(exported.path, args.tokens, args.runs),
            }
        )

    table = Table(title=f"export of {args.model!r} (decode on CPU provider, {os.cpu_count()} cores)")
    for col in (
        "precision",
        "optimum s",
        "quantize s",
        "parity s",
        "size MB",
        "decode tok/s",
        "prefill s",
        "top-1 agree",
        "greedy match",
        "max |Δlogit|",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        t = r["timings_s"]
        table.add_row(
            r["precision"],
            f"{t.get('optimum_export', 0):.1f}",
            f"{t.get('quantize', 0):.1f}",
            f"{t.get('parity', 0):.1f}",
            f"{r['size_mb']:.1f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['prefill_s']:.3f}",
            f"{r['top1_agreement']}",
            r["greedy_match"],
            f"{r['max_logit_diff']:.4f}" if r["max_logit_diff"] is not None else "-",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
