"""bench_serving: guidellm (vLLM's serving benchmark, in its own virtualenv) against a real accelserve server.

The slow test builds guidellm's virtualenv when it is missing (about a minute and 1.5 GB, once per checkout),
starts a server on a tiny local model and lets guidellm send a few streamed requests with its vLLM extensions
(`ignore_eos`, `max_completion_tokens`, `stream_options.continuous_usage_stats`). No speed is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from benchmarks import bench_serving
from benchmarks.report import render


def test_request_counts_give_every_stream_several_requests():
    assert bench_serving.request_counts([1, 4, 16], per_stream=3, minimum=8) == [8, 12, 48]


def test_scenario_is_what_guidellm_run_reads(tmp_path):
    scen = bench_serving.scenario(
        "http://127.0.0.1:9", "m", "/tok", [1, 8], [8, 24], 128, 64, 60.0, tmp_path / "r.json", api_key="k"
    )
    spec = scen["spec"]
    assert spec["backend"] == {"kind": "openai_http", "target": "http://127.0.0.1:9", "model": "m", "api_key": "k"}
    assert spec["profile"] == {"kind": "concurrent", "streams": [1, 8]}
    assert {"kind": "max_requests", "count": [8, 24]} in spec["constraints"]
    assert spec["tokenizer"]["model"] == "/tok"  # a local folder: guidellm never asks a hub
    assert spec["data"] == [{"kind": "synthetic_text", "prompt_tokens": 128, "output_tokens": 64}]
    assert spec["outputs"] == [{"kind": "json", "path": str(tmp_path / "r.json")}]


def test_int_list_refuses_zero_streams():
    assert bench_serving._int_list("16,1,4,4") == [1, 4, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="counts >= 1"):
        bench_serving._int_list("0,2")


@pytest.mark.slow  # builds guidellm's virtualenv when missing (~1-2 min), then a few requests on a tiny model
def test_guidellm_runs_against_a_real_server(tiny_llama: Path, accelserve_home: Path, tmp_path: Path) -> None:
    env = bench_serving.guidellm_env()
    print(
        f"guidellm virtualenv: {env['venv']} ({'built now' if env['built_now'] else 'reused'}; "
        f"install {env['install_s']} s, {env['disk_bytes'] / 1e9:.2f} GB)",
        file=sys.stderr,
    )
    assert Path(env["exe"]).is_file()
    streams, counts, output_tokens = [2], [4], 8
    model = str(tiny_llama)
    with bench_serving.running_server(model, "cpu", "torch", tmp_path / "server.log", timeout_s=300) as url:
        placement = bench_serving.warm_up(url, model)
        assert placement["backend"] == "torch" and placement["device"] == "cpu"
        assert bench_serving.server_capacity(url, placement["device_id"]) >= 1  # the torch backend's batch
        scen = bench_serving.scenario(
            url, model, model, streams, counts, 16, output_tokens, 120.0, tmp_path / "guidellm.json"
        )
        report = bench_serving.run_guidellm(env["exe"], scen, tmp_path, tmp_path / "guidellm.log", timeout_s=600)

    # guidellm's own file: every request succeeded, with tokens in and out
    saved = json.loads((tmp_path / "guidellm.json").read_text())
    assert saved["metadata"]["guidellm_version"] == bench_serving.GUIDELLM_VERSION
    (bench,) = saved["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    # guidellm's max_requests constraint can end the run before it counts the last request (seen: 3 of 4,
    # 47 of 48); what it counted must all have succeeded
    assert totals["errored"] == 0 and totals["incomplete"] == 0, totals
    assert 3 <= totals["successful"] == totals["total"] <= 4, totals
    assert bench["metrics"]["prompt_token_count"]["successful"]["min"] > 0
    # ignore_eos, as guidellm sends it, means exactly the requested tokens from every request
    assert bench["metrics"]["output_token_count"]["successful"]["min"] == output_tokens
    assert bench["metrics"]["output_token_count"]["successful"]["max"] == output_tokens

    (row,) = bench_serving.summarize_report(report)
    assert row["streams"] == 2
    assert row["output_tokens_total"] == totals["successful"] * output_tokens
    assert row["ttft_ms"]["median"] > 0 and row["itl_ms"]["median"] > 0 and row["output_tps"]["mean"] > 0


def test_report_renders_serving_results(tmp_path):
    row = {
        "streams": 8,
        "requests": {"successful": 24, "errored": 0, "incomplete": 0, "total": 24},
        "duration_s": 30.0,
        "prompt_tokens": 158,
        "output_tokens_total": 1536,
        "ttft_ms": {"median": 900.0, "p95": 2000.0, "mean": 1000.0},
        "itl_ms": {"median": 40.0, "p95": 80.0, "mean": 45.0},
        "tpot_ms": {"median": 55.0, "p95": 90.0, "mean": 60.0},
        "latency_s": {"median": 3.5, "p95": 5.0, "mean": 3.6},
        "output_tps": {"median": 50.0, "p95": 90.0, "mean": 51.2},
        "requests_per_s": 0.8,
    }
    result = {
        "tool": {"name": "guidellm", "version": "0.8.1"},
        "model": {"ref": "default"},
        "server": {"placement": {"device_id": "cpu:0", "backend": "torch", "precision": "bf16", "provider": "cpu"}},
        "settings": {"streams": [8], "requests": {"8": 24}, "prompt_tokens": 128, "output_tokens": 64},
        "rows": [row],
        "machine": {"load_average": [2.5, 2.0, 1.5]},
        "load_average_end": [3.0, 2.0, 1.5],
        "busy_warning": "the machine is busy",
    }
    (tmp_path / "serving_cpu_torch_bf16.json").write_text(json.dumps(result))
    text = render(tmp_path)
    assert "guidellm 0.8.1" in text
    assert "| 8 | 24 / 0 | 900 | 2000 | 40.0 | 80.0 | 55.0 | 3.50 | 5.00 | 51.2 | 50.0 | 90.0 |" in text
