"""Benchmark helpers (statistics, trace, simulation, energy) and smoke runs of both benchmarks on a tiny model.

No speed is asserted: the machine is shared. The smoke runs check that every code path runs and that the
JSON carries every field a reader (RESULTS.md, plots) relies on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading

import pytest

from backends.base import GenerationRequest, TokenChunk
from benchmarks.common import (
    EnergyMeter,
    Stats,
    machine_info,
    peak_rss_bytes,
    percentile,
    ratio,
    summarize,
    write_json,
)
from benchmarks.report import render
from benchmarks.workload import SLO, Outcome, TraceRequest, TraceShape, busy_seconds, make_trace, metrics, simulate

# ---- statistics ------------------------------------------------------------------------------------------------


def test_summarize_median_min_max_and_skips_missing():
    s = summarize([3.0, 1.0, None, 2.0, float("nan"), 10.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert summarize([5, 1, 3]).median == 3
    empty = summarize([None, float("nan")])
    assert empty.n == 0 and math.isnan(empty.median)
    assert empty.fmt() == "-"
    assert Stats(2.0, 1.0, 3.0, 3).fmt(1) == "2.0 (1.0-3.0)"
    assert Stats(2.0, 2.0, 2.0, 1).fmt(2) == "2.00"


def test_percentile_interpolates_like_numpy():
    xs = [1, 2, 3, 4]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 4
    assert percentile(xs, 95) == pytest.approx(3.85)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile(xs, 101)


def test_ratio_handles_missing_and_zero():
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(None, 1.0))
    assert math.isnan(ratio(float("nan"), 1.0))


def test_busy_seconds_is_the_union_of_intervals():
    assert busy_seconds([(0, 2), (1, 3), (5, 6)]) == 4
    assert busy_seconds([]) == 0
    assert busy_seconds([(2, 3), (0, 1)]) == 2


def test_write_json_turns_nan_into_null(tmp_path):
    path = write_json(tmp_path / "r" / "x.json", {"a": float("nan"), "s": Stats(1.0, 1.0, 1.0, 1), "p": tmp_path})
    data = json.loads(path.read_text())
    assert data["a"] is None
    assert data["s"] == {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    assert data["p"] == str(tmp_path)


def test_machine_info_describes_cpu_memory_and_versions():
    info = machine_info()
    assert info["cpu_model"] and info["logical_cores"] >= 1 and info["memory_bytes"] > 0
    assert info["versions"]["torch"] and info["versions"]["onnxruntime-genai"]
    assert "llama-cpp-python" in info["versions"]  # None when absent, but always listed
    assert peak_rss_bytes() > 10 * 2**20


def test_energy_meter_reads_rapl_counters_with_wraparound(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("999000000\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    sub = tmp_path / "intel-rapl:0:0"  # a sub-zone (cores): part of the package, must not be added twice
    sub.mkdir()
    (sub / "energy_uj").write_text("5\n")
    meter = EnergyMeter(rapl_root=tmp_path)
    meter.start()
    (zone / "energy_uj").write_text("4000000\n")  # wrapped: 1 J to the top + 4 J
    readings = meter.stop()
    assert list(readings) == ["rapl:intel-rapl:0"]
    assert readings["rapl:intel-rapl:0"].joules == pytest.approx(5.0)
    assert readings["rapl:intel-rapl:0"].source.startswith("measured")
    assert EnergyMeter(rapl_root=tmp_path / "absent").rapl_files() == []


# ---- trace, metrics, simulation --------------------------------------------------------------------------------


def test_trace_is_reproducible_and_mixed():
    shape = TraceShape(duration_s=60, chat_rate=0.5, long_rate=0.1, bursts=2, burst_size=5)
    a, b = make_trace(shape, seed=3), make_trace(shape, seed=3)
    assert a == b
    assert a != make_trace(shape, seed=4)
    kinds = {r.kind for r in a}
    assert kinds == {"chat", "long", "burst"}
    assert sum(r.kind == "burst" for r in a) == 10
    assert all(r.model == "large" and r.max_new_tokens == shape.long_tokens for r in a if r.kind == "long")
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    assert [r.index for r in a] == list(range(len(a)))


def _req(i: int, t: float = 0.0) -> TraceRequest:
    return TraceRequest(i, t, "chat", "small", "hi", 11, 5)


def test_metrics_goodput_latency_and_estimated_energy():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    fast = Outcome(_req(0), "npu:0", first_token_s=0.5, finish_s=1.5, new_tokens=11, service_start_s=0.0)
    slow_first = Outcome(_req(1), "npu:0", first_token_s=2.0, finish_s=3.0, new_tokens=11, service_start_s=1.0)
    failed = Outcome(_req(2), error="NoDeviceAvailable: pinned NPU cannot take it")
    m = metrics([fast, slow_first, failed], slo, {"npu:0": 2.0})
    assert (m["completed"], m["failed"], m["slo_met"]) == (2, 1, 1)
    assert m["goodput_fraction"] == pytest.approx(1 / 3)
    assert m["latency_p50_s"] == pytest.approx(2.25)  # failed requests have no latency
    assert m["tokens"] == 22 and m["throughput_tps"] == pytest.approx(22 / 3.0)
    assert m["per_device"]["npu:0"]["busy_s"] == pytest.approx(3.0)
    assert m["energy"]["joules"] == pytest.approx(6.0) and m["energy"]["source"].startswith("estimated")
    assert m["errors"] == {"NoDeviceAvailable": 1}
    measured = metrics([fast], slo, {"npu:0": 2.0}, measured_joules=11.0, energy_source="measured: rapl")
    assert measured["energy"] == {"joules": 11.0, "per_token_j": 1.0, "source": "measured: rapl"}


def test_simulation_routes_through_place_and_queues_beyond_capacity():
    from backends.profile import ModelProfile
    from benchmarks.bench_scheduler import large_profile
    from plugin.engine.costmodel import CostModel
    from plugin.engine.devices import parse_simulation

    small = ModelProfile("m", "llama", 135_000_000, 30, 576, 9, 3, 64, 49152, 2048)
    profiles = {"small": small, "large": large_profile(small)}
    # a simulated GPU on a CPU with bf16 (as discover_devices marks it here): the 7B profile fits at bf16
    devices = [
        dataclasses.replace(d, details={**d.details, "bf16": True}) for d in parse_simulation("gpu:24GB,npu:8GB")
    ]
    costs = CostModel(path=None)
    trace = [TraceRequest(i, 0.0, "chat", "small", "hi", 50, 20) for i in range(3)]
    trace.append(TraceRequest(3, 0.0, "long", "large", "story", 50, 20))
    out = simulate(trace, profiles, devices, "npu", costs, {"npu": 1, "gpu": 1})
    assert [o.device_id for o in out[:3]] == ["npu:0"] * 3
    assert out[3].error and "PlacementError" in out[3].error  # 6.7B is over the NPU ceiling
    ttfts = [o.ttft_s for o in out[:3]]
    assert ttfts[0] < ttfts[1] < ttfts[2]  # capacity 1: each waits for the one before
    auto = simulate(trace, profiles, devices, "auto", costs, {"npu": 4, "gpu": 8})
    assert all(o.ok for o in auto)
    assert auto[3].device_id == "gpu:0"  # the large model goes to the GPU under auto
    assert simulate(trace, profiles, devices, "auto", costs, {"npu": 4, "gpu": 8})[0].finish_s == auto[0].finish_s


# ---- disjoint cores --------------------------------------------------------------------------------------------


class _RecordingBackend:
    """Yields two chunks and records the CPU affinity of the thread that generates them."""

    def __init__(self) -> None:
        self.seen: list[set[int]] = []

    def load(self) -> None:
        pass

    def generate(self, request: GenerationRequest):
        def run():
            for i in range(2):
                self.seen.append(os.sched_getaffinity(0))
                yield TokenChunk(request.request_id, "x", [i], "length" if i else None)

        return run()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")
def test_pinned_backend_pins_only_the_generating_thread():
    from benchmarks.bench_scheduler import PinnedBackend

    core = min(os.sched_getaffinity(0))
    inner = _RecordingBackend()
    backend = PinnedBackend(inner, {core})
    before = os.sched_getaffinity(0)
    worker = threading.Thread(target=lambda: list(backend.generate(GenerationRequest(prompt="hi"))))
    worker.start()
    worker.join()
    assert inner.seen == [{core}, {core}]
    assert os.sched_getaffinity(0) == before  # the main thread is untouched


# ---- smoke runs on a tiny model --------------------------------------------------------------------------------


def test_parse_configs_names_the_fix():
    from benchmarks.bench_backends import Config, parse_configs

    assert parse_configs("torch:bf16, ort:int4", False) == [
        Config("torch", "bf16"),
        Config("onnxruntime-genai", "int4"),
    ]
    assert len(parse_configs(None, False)) == 5
    with pytest.raises(ValueError, match="engine:precision"):
        parse_configs("ort:fp64", False)
    with pytest.raises(ValueError, match="llama-cpp-python"):
        parse_configs("llama.cpp", False)


def _stats(d: dict) -> None:
    assert set(d) == {"median", "min", "max", "n"} and d["n"] >= 1


@pytest.mark.slow  # a whole benchmark run on a tiny model: smoke, seconds each
def test_bench_backends_quick_writes_every_field(tiny_llama, accelserve_home, tmp_path):
    from benchmarks.bench_backends import main

    out = tmp_path / "backends.json"
    args = ["--model", str(tiny_llama), "--quick", "--in-process", "--configs", "torch:fp32,ort:fp32"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"cpu_model", "physical_cores", "logical_cores", "memory_bytes", "versions"} <= set(data["machine"])
    assert data["settings"]["concurrency"] == [1, 2] and data["settings"]["runs"] == 1
    assert [(r["engine"], r["precision"]) for r in data["rows"]] == [("torch", "fp32"), ("onnxruntime-genai", "fp32")]
    for row in data["rows"]:
        ours, bare = row["ours"], row["bare"]
        assert ours["provider"] in ("cpu", "CPUExecutionProvider")  # what really ran, never a GPU/NPU name
        for r in (ours, bare):
            for key in ("load_s", "ttft_s", "decode_tps"):
                _stats(r[key])
            assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
        for streams in ("1", "2"):
            _stats(ours["concurrency"][streams]["aggregate_tps"])
            tpot = ours["concurrency"][streams]["tpot_s"]  # per-stream time per output token
            assert tpot["p95"] >= tpot["p50"] > 0 and tpot["n"] == int(streams)
        assert sum(ours["concurrency"]["2"]["tokens"]) > 0
        assert ours["peak_rss_bytes"] >= ours["peak_rss_single_stream_bytes"] > 0
        _stats(row["overhead"]["decode_tps_ratio"])
        assert row["overhead"]["load_s_ratio"] > 0 and row["overhead"]["peak_rss_ratio"] > 0
    assert data["targets"] == {"note": "no int4 onnxruntime-genai row measured"}  # the targets need an int4 row
    for name in ("backends_decode.png", "backends_ttft.png", "backends_concurrency.png"):
        assert (tmp_path / name).stat().st_size > 1000
    md = render(tmp_path)  # the RESULTS.md section is rendered from this JSON
    assert "| torch fp32 | cpu | ours: TorchBackend |" in md and "*ours / bare*" in md
    assert data["machine"]["cpu_model"] in md


@pytest.mark.slow  # a whole benchmark run on a tiny model: smoke, seconds each
def test_bench_backends_isolates_each_side_in_a_subprocess(tiny_llama, accelserve_home, tmp_path):
    from benchmarks.bench_backends import main

    out = tmp_path / "backends.json"
    assert main(["--model", str(tiny_llama), "--quick", "--configs", "ort:int4", "--out", str(out), "--no-plots"]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["isolation"].startswith("one subprocess")
    row = data["rows"][0]
    # each side's peak is its own process's: the bare engine alone never imports torch
    assert row["bare"]["peak_rss_bytes"] < 300 * 2**20


def _check_section(section: dict, policies: set[str]) -> None:
    assert set(section["runs"]) == policies
    for run in section["runs"].values():
        m = run["metrics"]
        for key in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s", "goodput_fraction", "throughput_tps"):
            assert key in m
        assert m["requests"] == m["completed"] + m["failed"] > 0
        assert m["energy"]["source"].startswith(("estimated", "measured"))
        assert m["per_device"]


def test_bench_scheduler_simulation_through_the_cli(tiny_llama, accelserve_home, tmp_path, monkeypatch):
    from plugin.serve.cli import main

    out = tmp_path / "scheduler.json"
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    try:  # the CLI runs the script as __main__, which ends with SystemExit(main())
        code = main(["bench", "scheduler", "--model", str(tiny_llama), "--quick", "--no-live", "--out", str(out)])
    except SystemExit as e:
        code = e.code
    assert code == 0
    data = json.loads(out.read_text())
    assert {"cpu_model", "logical_cores", "memory_bytes", "versions"} <= set(data["machine"])
    assert data["settings"]["slo"] and data["trace"]["requests"] > 0 and data["model_note"]
    this = data["sections"]["simulated_this_machine"]
    assert this["source"].startswith("simulated")
    _check_section(this, {"auto", "gpu", "npu"})  # the simulated inventory has no host CPU device
    fleet = data["sections"]["simulated_fleet"]
    _check_section(fleet, {"auto", "latency", "throughput", "energy", "gpu", "npu", "cpu"})
    assert fleet["runs"]["npu"]["metrics"]["failed"] > 0  # the 7B profile never fits an NPU
    assert (tmp_path / "scheduler_simulated_fleet_goodput.png").is_file()
    md = render(tmp_path)
    assert "### simulated (hypothetical fleet)" in md and "| energy |" in md
    assert "results/scheduler_simulated_fleet_latency.png" in md


@pytest.mark.slow  # a whole benchmark run on a tiny model: smoke, seconds each
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_bench_scheduler_live_replay_on_disjoint_cores(tiny_llama, accelserve_home, tmp_path):
    from benchmarks.bench_scheduler import main

    out = tmp_path / "scheduler.json"
    args = ["--model", str(tiny_llama), "--quick", "--no-sim", "--policies", "auto", "--no-plots"]
    assert main([*args, "--out", str(out)]) == 0
    live = json.loads(out.read_text())["sections"]["live_disjoint_cores"]
    assert live["source"] == "live (disjoint cores)"
    assert live["cores"]["gpu:0"] != live["cores"]["npu:0"]
    pins = live["pinning"]
    torch_pin = next(v for k, v in pins.items() if "torch" in k)
    assert torch_pin["intra_op_threads"] == 1 and torch_pin["torch_batch_thread_affinity"] == torch_pin["cores"]
    assert next(v for k, v in pins.items() if "onnxruntime-genai" in k)["intra_op_threads"] == 1
    _check_section(live, {"auto"})
    rows = live["runs"]["auto"]["outcomes"]
    assert {r["device_id"] for r in rows if r["model"] == "large" and not r["error"]} <= {"gpu:0"}
    assert all(r["error"] is None for r in rows)


@pytest.mark.slow  # a whole benchmark run on a tiny model: smoke, seconds each
def test_compute_variants_rewrite_only_accuracy_levels(tiny_llama, accelserve_home, tmp_path):
    """bench_vs_llamacpp --compute-variants: hard-linked copies whose 4-bit MatMulNBits levels match the label."""
    import onnx

    from benchmarks.bench_vs_llamacpp import COMPUTE_VARIANTS, compute_variants
    from plugin.convert import export

    exported = export(tiny_llama, home=accelserve_home, target="cpu", precision="int4", progress=False)
    variants = compute_variants(exported.path, tmp_path / "work")
    assert list(variants) == list(COMPUTE_VARIANTS)
    for label, folder in variants.items():
        assert os.path.samefile(folder / "model.onnx.data", exported.path / "model.onnx.data")
        nodes = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
        for node in (n for n in nodes if n.op_type == "MatMulNBits"):
            attrs = {a.name: a.i for a in node.attribute}
            if attrs["bits"] == 8:
                assert attrs["accuracy_level"] == 4, node.name  # lm_head untouched
            else:
                fp32 = any(part in node.name for part in COMPUTE_VARIANTS[label])
                assert attrs["accuracy_level"] == (0 if fp32 else 4), (label, node.name)


def test_bench_backends_targets_are_ratios_of_one_run():
    """Issue 17's targets from the int4 row and llama.cpp's row: ratios, goals, met or not (no speed asserted)."""
    from benchmarks.bench_backends import targets
    from benchmarks.common import Stats

    def conc(agg1: float, agg8: float, tpot1: float, tpot8: float) -> dict:
        entry = lambda agg, tpot: {"aggregate_tps": Stats(agg, agg, agg, 1), "tpot_s": {"p50": tpot}}  # noqa: E731
        return {"1": entry(agg1, tpot1), "8": entry(agg8, tpot8)}

    ours = {
        "decode_tps": Stats(300, 300, 300, 1),
        "peak_rss_single_stream_bytes": 240,
        "concurrency": conc(100, 400, 0.004, 0.012),
    }
    llama = {
        "decode_tps": Stats(150, 150, 150, 1),
        "peak_rss_single_stream_bytes": 200,
        "concurrency": conc(90, 200, 0.005, 0.02),
    }
    rows = [
        {"engine": "onnxruntime-genai", "precision": "int4", "ours": ours},
        {"engine": "llama.cpp", "precision": "gguf", "bare": llama},
    ]
    got = {name: (round(v["value"], 2), v["met"]) for name, v in targets(rows).items()}
    assert got == {
        "int4 aggregate x8 / its own x1": (4.0, True),
        "int4 aggregate x8 / llama.cpp x8": (2.0, True),
        "int4 single-stream decode / llama.cpp": (1.5, True),  # against llama.cpp's faster batch-1 rate (200 > 150)
        "int4 peak RSS (single stream) / llama.cpp": (1.2, True),
        "int4 TPOT p50 x8 / x1": (3.0, False),
    }
