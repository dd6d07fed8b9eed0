"""Render benchmarks/RESULTS.md from the latest JSON results, so the README section never drifts from the data.

    python -m benchmarks.report            # rewrite benchmarks/RESULTS.md from benchmarks/results/*.json

Both benchmark scripts call this after writing to the default results folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR

RESULTS_MD = RESULTS_DIR.parent / "RESULTS.md"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _num(x: Any, digits: int = 1, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * scale:.{digits}f}"


def _stat(s: dict[str, Any] | None, digits: int = 1, scale: float = 1.0) -> str:
    if not s or not s.get("n"):
        return "-"
    med = _num(s["median"], digits, scale)
    if s["n"] == 1:
        return med
    return f"{med} ({_num(s['min'], digits, scale)}–{_num(s['max'], digits, scale)})"


def machine_section(m: dict[str, Any]) -> list[str]:
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return [
        f"- CPU: {m['cpu_model']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores, "
        f"{m['memory_bytes'] / 2**30:.0f} GiB RAM; GPUs: {', '.join(m.get('gpus') or []) or 'none'}",
        f"- {m['platform']}, Python {m['python']}; {libs}",
        f"- commit {m.get('git_commit') or '?'}, run at {m['time']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m.get('load_average') or [])}",
    ]


def backends_section(d: dict[str, Any]) -> list[str]:
    s = d["settings"]
    streams = [str(c) for c in s["concurrency"]]
    lines = [
        "## Backends beside the engines they wrap",
        "",
        f"Model {d['model']['name']}; greedy, {s['new_tokens']} new tokens per request; median (min–max) of "
        f"{s['runs']} runs after a warm-up; {s['isolation']}. llama.cpp: {d['llama_cpp']}.",
        "",
        "| config | runs on | engine | load s | peak RSS MB | TTFT ms | decode tok/s (batch 1) | "
        + " | ".join(f"aggregate tok/s ×{c}" for c in streams)
        + " |",
        "|---" * (7 + len(streams)) + "|",
    ]
    for row in d["rows"]:
        cfg = f"{'ort' if row['engine'] == 'onnxruntime-genai' else row['engine']} {row['precision']}"
        provider = row.get("ours", row.get("bare", {})).get("provider", "-")
        provider = str(provider).removesuffix("ExecutionProvider")
        for side in ("ours", "bare"):
            r = row.get(side)
            if r is None:
                continue
            conc = r.get("concurrency", {})
            cells = [
                cfg,
                provider,
                f"{side}: {r['name']}",
                _stat(r["load_s"], 2),
                _num(r["peak_rss_bytes"], 0, 1e-6),
                _stat(r.get("ttft_s"), 0, 1e3),
                _stat(r.get("decode_tps"), 1),
                *(_stat(conc[c]["aggregate_tps"], 1) if c in conc else "-" for c in streams),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if "overhead" in row:
            o = row["overhead"]
            ratio = lambda st: f"{st['median']:.2f}×" if st and st.get("n") else "-"  # noqa: E731
            cells = [
                cfg,
                "",
                "*ours / bare*",
                f"{o['load_s_ratio']:.2f}×" if o.get("load_s_ratio") else "-",
                f"{o['peak_rss_ratio']:.2f}×" if o.get("peak_rss_ratio") else "-",
                ratio(o["ttft_ratio"]),
                ratio(o["decode_tps_ratio"]),
                *("" for _ in streams),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Decode tok/s = (tokens − 1) / (last − first token time); the overhead ratio is the median of per-pair "
        "ratios of back-to-back runs on the same loaded weights. Aggregate = all tokens / wall time of N concurrent "
        "requests through our backend at its default max batch size (prefill included). TTFT of ours includes the "
        "chat template and tokenization; the bare loops start from token ids. Peak RSS and load time are not "
        "like for like: our side's peak includes the concurrency runs (up to 16 streams, each with its own KV "
        "cache) and the tokenizer our streaming detokenizer loads, and its load time includes reading the chat "
        "template and tokenizer; the bare side runs batch 1 only.",
        "",
        "![decode](results/backends_decode.png) ![ttft](results/backends_ttft.png)",
        "![concurrency](results/backends_concurrency.png)",
        "",
    ]
    if d.get("busy_warning"):
        lines.insert(3, f"> **Conditions:** {d['busy_warning']}.\n")
    return lines


def scheduler_section(d: dict[str, Any]) -> list[str]:
    lines = [
        "## The scheduler under a mixed workload",
        "",
        f"Trace (seed {d['settings']['seed']}): {d['trace']['shape']} — {d['trace']['requests']} requests. "
        f"SLO: {d['settings']['slo']}. Models: {d['model_note']}.",
        "",
    ]
    if d.get("busy_warning"):
        lines += [f"> **Conditions:** {d['busy_warning']}.", ""]
    for key, section in d["sections"].items():
        lines += [f"### {section['source']}", ""]
        if key == "live_disjoint_cores":
            lines.append(
                "Pinning as measured: "
                + "; ".join(_pin(k, v) for k, v in section["pinning"].items())
                + ". Idle rates the warm-up measured: "
                + "; ".join(
                    f"{r['model']} on {r['device_id']} {r['decode_tps']:.0f} tok/s decode"
                    for r in section["measured_rates"]
                    if r["source"].startswith("measured")
                )
                + "."
            )
            lines.append("")
        if "trace" in section:
            lines += [f"Trace: {section['trace']['shape']} — {section['trace']['requests']} requests.", ""]
        lines += [
            "| policy | served / failed | placed on | latency p50 s | p95 s | TTFT p50 s | TTFT p95 s | "
            "met SLO | tok/s | J/token | energy |",
            "|---" * 11 + "|",
        ]
        for policy, run in section["runs"].items():
            m = run["metrics"]
            placed = ", ".join(f"{dev} {v['requests']}" for dev, v in sorted(m["per_device"].items()))
            cells = [
                policy,
                f"{m['completed']} / {m['failed']}",
                placed,
                _num(m["latency_p50_s"], 2),
                _num(m["latency_p95_s"], 2),
                _num(m["ttft_p50_s"], 2),
                _num(m["ttft_p95_s"], 2),
                f"{m['slo_met']} ({m['goodput_fraction']:.0%})",
                _num(m["throughput_tps"], 1),
                _num(m["energy"]["per_token_j"], 3),
                m["energy"]["source"],
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"![latency](results/scheduler_{key}_latency.png) ![goodput](results/scheduler_{key}_goodput.png)",
            "",
        ]
    if d.get("real_devices_note"):
        lines += [f"Real accelerators: {d['real_devices_note']}.", ""]
    return lines


def _pin(key: str, v: dict[str, Any]) -> str:
    device, backend, precision = key.split(" ", 2)
    text = f"{device} ({backend} {precision}) on core {', '.join(map(str, v['cores']))}"
    text += f", {v.get('intra_op_threads')} intra-op thread(s)"
    if "torch_batch_thread_affinity" in v:
        text += f", torch batch thread affinity {v['torch_batch_thread_affinity']}"
    return text


def serving_section(results: list[dict[str, Any]]) -> list[str]:
    """guidellm's numbers over HTTP, one table per server configuration (benchmarks/bench_serving.py)."""
    tool = results[0]["tool"]
    lines = [
        "## Serving over HTTP, measured by guidellm",
        "",
        f"guidellm {tool['version']} (vLLM's serving benchmark, in its own virtualenv) against a live "
        "`accelserve serve` app on a loopback port: `concurrent` profile, synthetic prompts, exactly the "
        "requested output tokens (guidellm sends `ignore_eos`), streamed chat completions, one warm-up request "
        "first. guidellm runs on the same machine and shares its cores with the server. Produced by "
        "`make bench-serving` (`benchmarks/bench_serving.py`).",
        "",
    ]
    for r in results:
        p, s = r["server"]["placement"], r["settings"]
        load = r.get("machine", {}).get("load_average") or []
        end = r.get("load_average_end") or []
        text = (
            f"Prompt {s['prompt_tokens']} tokens (before the chat template), {s['output_tokens']} generated; requests "
            f"at {'/'.join(s['requests'])} streams: {'/'.join(map(str, s['requests'].values()))}"
        )
        if load and end:
            text += f"; 1-minute load average {load[0]:.2f} at the start, {end[0]:.2f} at the end"
        text += "."
        if cap := r["server"].get("concurrent_generations"):
            text += (
                f" The server runs {cap} generations at once on this backend; more wait in its line, and their "
                "TTFT includes the wait."
            )
        title = f"{r['model']['ref']} on {p.get('device_id')}: {p.get('backend')} {p.get('precision')}"
        lines += [f"### {title} ({p.get('provider')})", "", text, ""]
        if r.get("busy_warning"):
            lines += [f"> **Conditions:** {r['busy_warning']}.", ""]
        lines += [
            "| streams | ok / failed | TTFT ms p50 | p95 | ITL ms p50 | p95 | TPOT ms p50 | latency s p50 | p95 | "
            "output tok/s | p50 | p95 |",
            "|---" * 12 + "|",
        ]
        for row in r["rows"]:
            req = row["requests"]
            cells = [
                str(row["streams"]),
                f"{req['successful']} / {req['errored'] + req['incomplete']}",
                _num(row["ttft_ms"]["median"], 0),
                _num(row["ttft_ms"]["p95"], 0),
                _num(row["itl_ms"]["median"], 1),
                _num(row["itl_ms"]["p95"], 1),
                _num(row["tpot_ms"]["median"], 1),
                _num(row["latency_s"]["median"], 2),
                _num(row["latency_s"]["p95"], 2),
                _num(row["output_tps"]["mean"], 1),
                _num(row["output_tps"]["median"], 1),
                _num(row["output_tps"]["p95"], 1),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "TTFT: request sent to first streamed token (queueing, chat template, tokenization and prefill included). "
        "ITL: a request's (latency − TTFT) / (tokens − 1), its mean gap between streamed tokens, weighted per token "
        "by guidellm; TPOT: latency / output tokens (TTFT included). Output tok/s: guidellm's server throughput, "
        "the mean of its output-token rate over the run, then the median and p95 of that rate.",
        "",
    ]
    return lines


def ort_batching_section(d: dict[str, Any]) -> list[str]:
    """benchmarks/bench_ort_batching.py: concurrent streams on the onnxruntime-genai CPU path, per strategy."""
    strategies: dict[str, dict[str, Any]] = d.get("strategies", {})
    counts = sorted({int(n) for rows in strategies.values() for n in rows})
    load = d.get("load_average_before", [None])[0], d.get("load_average_after", [None])[0]
    lines = [
        "## Concurrent streams on the onnxruntime-genai CPU path",
        "",
        f"`benchmarks/bench_ort_batching.py` on `{d.get('export', '?')}`: {d.get('max_new_tokens')} new tokens per "
        f"stream (EOS ignored), greedy, different prompts ({min(d.get('prompt_tokens') or [0])}–"
        f"{max(d.get('prompt_tokens') or [0])} tokens); aggregate tok/s = all tokens / wall time, median (min–max) of "
        f"{d.get('repeats')} runs alternating the strategies; 1-minute load average {_num(load[0], 2)} before, "
        f"{_num(load[1], 2)} after.",
        "",
    ]
    if d.get("busy"):
        lines += [f"> **Conditions:** {d['busy']}.", ""]
    baseline = d.get("baseline", "generators")  # the strategy the ratio column divides by
    lines += [
        "| strategy | " + " | ".join(f"×{n} tok/s | ×{n} vs {baseline} | ×{n} streams = alone" for n in counts) + " |",
        "|---|" + "---|---|---|" * len(counts),
    ]
    for name, rows in strategies.items():
        cells = []
        for n in counts:
            row = rows.get(str(n), {})
            if "error" in row or not row:
                cells += [f"failed: {row.get('error', '-')[:60]}", "-", "-"]
                continue
            cells += [
                _stat(row.get("aggregate_tok_s")),
                f"{_num(row.get('vs_baseline', row.get('vs_generators')), 2)}×",
                f"{row.get('streams_equal_alone')}/{n}",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""]
    lines += [f"- {name}: {note}" for name, note in d.get("notes", {}).items()]
    lines += [""]
    return lines


def render(results_dir: Path = RESULTS_DIR) -> str:
    backends = _load(results_dir / "backends.json")
    scheduler = _load(results_dir / "scheduler.json")
    lines = [
        "# Benchmark results",
        "",
        "Produced by `make bench` (`accelserve bench backends` and `accelserve bench scheduler`) and `make "
        "bench-serving` (guidellm over HTTP); this file is "
        "rewritten from `benchmarks/results/*.json` by `python -m benchmarks.report`.",
        "",
    ]
    serving = [d for f in sorted(results_dir.glob("serving_*.json")) if (d := _load(f))]
    machine = (backends or scheduler or {}).get("machine")
    if machine:
        lines += ["## Machine and conditions", "", *machine_section(machine), ""]
    if backends:
        lines += backends_section(backends)
    if scheduler:
        lines += scheduler_section(scheduler)
    if serving:
        lines += serving_section(serving)
    ort_batching = _load(results_dir / "ort_batching.json")
    if ort_batching:
        lines += ort_batching_section(ort_batching)
    return "\n".join(lines).rstrip() + "\n"


def write_results_md(results_dir: Path = RESULTS_DIR, path: Path = RESULTS_MD) -> Path:
    path.write_text(render(results_dir))
    return path


if __name__ == "__main__":
    print(write_results_md())
