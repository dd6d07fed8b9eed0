"""Placement over made-up inventories, and the cost model it predicts with."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
from transformers import LlamaConfig

from backends.profile import ModelProfile, profile_from_config
from plugin.engine.costmodel import CostModel, device_profile, prior_rates
from plugin.engine.devices import DeviceInfo, parse_simulation
from plugin.engine.scheduler import (
    NPU_MAX_PARAMS,
    DeviceLoad,
    Placement,
    PlacementError,
    PlacementRequest,
    place,
)

from tiny_models import TINY_CONFIGS

GB = 10**9

# ---- profiles and inventories ---------------------------------------------------------------------


def _profile(name: str, **cfg) -> ModelProfile:
    return profile_from_config(LlamaConfig(**cfg), name)


TINY = _profile("tiny-llama", vocab_size=400, **TINY_CONFIGS["llama"])
SMALL = _profile(  # SmolLM2-135M's shape
    "smollm2-135m",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
LARGE = _profile(  # Llama-2-7B's shape, no weights
    "llama-2-7b-like",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
PROFILES = {"tiny": TINY, "small": SMALL, "large": LARGE}

CPU = DeviceInfo(
    "cpu", "Test CPU", 32 * GB, ("torch", "onnxruntime-genai"), ("CPUExecutionProvider",),
    details={"physical_cores": 8, "bf16": False},
)  # fmt: skip
GPU = DeviceInfo("gpu", "Test GPU", 24 * GB, ("torch",), ("CUDAExecutionProvider",), details={"bf16": True})
NPU = DeviceInfo("npu", "Test NPU", 16 * GB, ("onnxruntime-genai",), ("QNNExecutionProvider",))
INVENTORIES = {"cpu": [CPU], "cpu+npu": [CPU, NPU], "cpu+gpu": [CPU, GPU], "cpu+gpu+npu": [CPU, GPU, NPU]}
CHAT = PlacementRequest(prompt_tokens=200, max_new_tokens=128)


def test_profiles_are_the_sizes_we_think():
    assert TINY.num_parameters < 10**6
    assert 130e6 < SMALL.num_parameters < 140e6
    assert 6.5e9 < LARGE.num_parameters < 7e9


# ---- the placement matrix -------------------------------------------------------------------------

ERR = "error"
# (model, inventory) -> expected device id per policy; "error" = PlacementError
MATRIX: dict[tuple[str, str], dict[str, str]] = {
    ("tiny", "cpu"): dict(auto="cpu:0", energy="cpu:0", cpu="cpu:0", gpu=ERR, npu=ERR),
    ("tiny", "cpu+npu"): dict(auto="npu:0", energy="npu:0", cpu="cpu:0", gpu=ERR, npu="npu:0"),
    ("tiny", "cpu+gpu"): dict(auto="gpu:0", energy="cpu:0", cpu="cpu:0", gpu="gpu:0", npu=ERR),
    ("tiny", "cpu+gpu+npu"): dict(auto="npu:0", energy="npu:0", cpu="cpu:0", gpu="gpu:0", npu="npu:0"),
    ("small", "cpu"): dict(auto="cpu:0", energy="cpu:0", cpu="cpu:0", gpu=ERR, npu=ERR),
    ("small", "cpu+npu"): dict(auto="npu:0", energy="npu:0", cpu="cpu:0", gpu=ERR, npu="npu:0"),
    ("small", "cpu+gpu"): dict(auto="gpu:0", energy="cpu:0", cpu="cpu:0", gpu="gpu:0", npu=ERR),
    ("small", "cpu+gpu+npu"): dict(auto="npu:0", energy="npu:0", cpu="cpu:0", gpu="gpu:0", npu="npu:0"),
    # 7B: never on the NPU (param ceiling); on the CPU only in bf16 (fp32 needs 27 GB > 24 GB budget)
    ("large", "cpu"): dict(auto="cpu:0", energy="cpu:0", cpu="cpu:0", gpu=ERR, npu=ERR),
    ("large", "cpu+npu"): dict(auto="cpu:0", energy="cpu:0", cpu="cpu:0", gpu=ERR, npu=ERR),
    ("large", "cpu+gpu"): dict(auto="gpu:0", energy="gpu:0", cpu="cpu:0", gpu="gpu:0", npu=ERR),
    ("large", "cpu+gpu+npu"): dict(auto="gpu:0", energy="gpu:0", cpu="cpu:0", gpu="gpu:0", npu=ERR),
}
CASES = [(m, inv, pol, want) for (m, inv), row in MATRIX.items() for pol, want in row.items()]


@pytest.mark.parametrize(("model", "inventory", "policy", "expected"), CASES)
def test_placement_matrix(model, inventory, policy, expected):
    profile, devices = PROFILES[model], INVENTORIES[inventory]
    if expected == ERR:
        with pytest.raises(PlacementError) as e:
            place(profile, devices, CHAT, policy)
        assert str(e.value)
        return
    p = place(profile, devices, CHAT, policy)
    assert p.device_id == expected
    assert p.device == expected.split(":")[0]
    assert len(p.reason) > 40 and p.device_id in p.reason
    assert p.predicted_ttft_s > 0 and p.predicted_tokens_per_s > 0
    assert not p.simulated and p.fallback_from == ()
    _check_alternatives(p, devices)


def _check_alternatives(p: Placement, devices):
    assert len(p.alternatives) == len(devices)
    assert p.alternatives[0].device_id == p.device_id and p.alternatives[0].why.startswith("chosen")
    assert {a.device_id for a in p.alternatives} == {d.id for d in devices}
    assert all(a.why for a in p.alternatives)
    feasibility = [a.feasible for a in p.alternatives]
    assert feasibility == sorted(feasibility, reverse=True)  # infeasible ones come last


@pytest.mark.parametrize("model", ["tiny", "small", "large"])
@pytest.mark.parametrize("inventory", list(INVENTORIES))
def test_latency_and_throughput_pick_the_best_prediction(model, inventory):
    profile, devices = PROFILES[model], INVENTORIES[inventory]
    lat = place(profile, devices, CHAT, "latency")
    feasible = [a for a in lat.alternatives if a.feasible]
    assert lat.alternatives[0].predicted_total_s == min(a.predicted_total_s for a in feasible)
    assert "least predicted time" in lat.reason
    thr = place(profile, devices, CHAT, "throughput")
    feasible = [a for a in thr.alternatives if a.feasible]
    assert thr.alternatives[0].predicted_tokens_per_s == max(a.predicted_tokens_per_s for a in feasible)
    assert "highest predicted generation rate" in thr.reason


def test_reason_names_the_deciding_numbers():
    p = place(SMALL, [CPU, GPU, NPU], CHAT, "auto")
    assert p.device_id == "npu:0" and p.backend == "onnxruntime-genai" and p.precision == "int4"
    assert p.provider == "QNNExecutionProvider"
    for piece in ("135M-param model", "int4", "KV cache for 328 tokens", "budget", "75% of 16.0 GB", "policy auto"):
        assert piece in p.reason, piece


def test_precisions_per_device():
    assert place(SMALL, [CPU, GPU], CHAT, "gpu").precision == "bf16"
    fp16_gpu = DeviceInfo("gpu", "Turing", 16 * GB, ("torch",), ("CUDAExecutionProvider",), details={"bf16": False})
    p = place(SMALL, [CPU, fp16_gpu], CHAT, "gpu")
    assert (p.precision, p.provider) == ("fp16", "cuda:0")
    cpu_small = place(SMALL, [CPU], CHAT, "cpu")
    assert (cpu_small.backend, cpu_small.precision) == ("onnxruntime-genai", "int4")
    cpu_large = place(LARGE, [CPU], CHAT, "cpu")
    assert (cpu_large.backend, cpu_large.precision) == ("torch", "bf16")  # fp32 does not fit 24 GB
    assert place(SMALL, [CPU], CHAT, "cpu", cpu_backend="torch").precision == "fp32"


def test_energy_reason_cites_watts():
    p = place(SMALL, [CPU, GPU, NPU], CHAT, "energy")
    assert p.device_id == "npu:0" and "W assumed" in p.reason and " J " in p.reason


# ---- heavy requests under auto --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "trigger"),
    [
        (PlacementRequest(prompt_tokens=3000, max_new_tokens=64), "prompt of 3000 tokens"),
        (PlacementRequest(prompt_tokens=100, max_new_tokens=1024), "1024 new tokens"),
        (PlacementRequest(prompt_tokens=100, max_new_tokens=64, concurrency=8), "concurrency 8"),
    ],
)
def test_heavy_requests_go_to_the_gpu(request_, trigger):
    p = place(SMALL, [CPU, GPU, NPU], request_, "auto")
    assert p.device_id == "gpu:0"
    assert "heavy work" in p.reason and trigger in p.reason


def test_heavy_request_without_gpu_goes_to_the_fastest():
    req = PlacementRequest(prompt_tokens=3000, max_new_tokens=64)
    p = place(SMALL, [CPU, NPU], req, "auto")
    assert "there is no GPU" in p.reason
    assert p.alternatives[0].predicted_total_s <= min(a.predicted_total_s for a in p.alternatives if a.feasible)


def test_throughput_prefers_gpu_batching_for_many_streams():
    req = PlacementRequest(prompt_tokens=64, max_new_tokens=256, concurrency=16)
    assert place(SMALL, [CPU, GPU], req, "throughput").device_id == "gpu:0"


# ---- feasibility ----------------------------------------------------------------------------------


def test_large_model_never_on_npu_even_with_memory():
    huge_npu = DeviceInfo("npu", "Big NPU", 512 * GB, ("onnxruntime-genai",), ("QNNExecutionProvider",))
    assert LARGE.num_parameters > NPU_MAX_PARAMS
    for policy in ("auto", "latency", "throughput", "energy"):
        p = place(LARGE, [CPU, huge_npu], CHAT, policy)
        assert p.device_id == "cpu:0"
        (npu_alt,) = [a for a in p.alternatives if a.kind == "npu"]
        assert not npu_alt.feasible and "NPU ceiling" in npu_alt.why
    with pytest.raises(PlacementError, match="NPU ceiling"):
        place(LARGE, [CPU, huge_npu], CHAT, "npu")


def test_kv_cache_times_concurrency_counts_against_the_budget():
    small_npu = DeviceInfo("npu", "Small NPU", 200 * 10**6, ("onnxruntime-genai",), ("QNNExecutionProvider",))
    one = PlacementRequest(prompt_tokens=500, max_new_tokens=500, concurrency=1)
    assert place(SMALL, [CPU, small_npu], one, "npu").device_id == "npu:0"
    four = PlacementRequest(prompt_tokens=500, max_new_tokens=500, concurrency=4)
    with pytest.raises(PlacementError, match=r"KV cache\) but its budget is 150 MB"):
        place(SMALL, [CPU, small_npu], four, "npu")
    assert place(SMALL, [CPU, small_npu], four, "latency").device_id == "cpu:0"


def test_pinned_gpu_too_small_says_so():
    gpu8 = DeviceInfo("gpu", "8 GB GPU", 8 * GB, ("torch",), ("CUDAExecutionProvider",), details={"bf16": True})
    with pytest.raises(PlacementError) as e:
        place(LARGE, [CPU, gpu8], CHAT, "gpu")
    msg = str(e.value)
    assert "pins the GPU" in msg and "gpu:0" in msg and "13.5 GB weights at bf16" in msg and "7.2 GB" in msg
    moved = place(LARGE, [CPU, gpu8], CHAT, "auto")  # unpinned: it moves, and says why
    assert moved.device_id == "cpu:0" and "the GPU cannot take it" in moved.reason


def test_pinned_absent_device_error_lists_devices_and_simulation():
    with pytest.raises(PlacementError) as e:
        place(SMALL, [CPU, NPU], CHAT, "gpu")
    msg = str(e.value)
    assert "no GPU here" in msg and "cpu:0 (Test CPU)" in msg and "npu:0 (Test NPU)" in msg
    assert "ACCELSERVE_SIMULATE=gpu:24GB" in msg


def test_nothing_fits_lists_every_device():
    tiny_cpu = DeviceInfo("cpu", "Tiny CPU", 1 * GB, ("torch", "onnxruntime-genai"), ("CPUExecutionProvider",))
    with pytest.raises(PlacementError) as e:
        place(LARGE, [tiny_cpu], CHAT, "auto")
    assert "cpu:0: needs" in str(e.value) and "smaller" in str(e.value)


def test_npu_without_genai_runtime_is_skipped():
    vitis = DeviceInfo("npu", "AMD NPU", 16 * GB, (), ("VitisAIExecutionProvider",), details={"note": "no genai"})
    p = place(SMALL, [CPU, vitis], CHAT, "auto")
    assert p.device_id == "cpu:0"
    assert "needs the onnxruntime-genai runtime" in p.reason  # auto explains why the NPU was passed over


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown placement policy 'fastest'"):
        place(SMALL, [CPU], CHAT, "fastest")
    with pytest.raises(ValueError, match="cpu_backend"):
        place(SMALL, [CPU], CHAT, cpu_backend="tensorrt")
    with pytest.raises(ValueError, match="max_new_tokens"):
        PlacementRequest(prompt_tokens=10, max_new_tokens=0)
    with pytest.raises(ValueError, match="concurrency"):
        PlacementRequest(prompt_tokens=10, max_new_tokens=5, concurrency=0)
    with pytest.raises(PlacementError, match="no devices"):
        place(SMALL, [], CHAT)


# ---- load, health, exclusion ----------------------------------------------------------------------


def test_long_queue_spills_to_another_device():
    idle = place(SMALL, [CPU, GPU, NPU], CHAT, "auto")
    assert idle.device_id == "npu:0"
    busy = {"npu:0": DeviceLoad(queued_requests=6, active_requests=1, queued_tokens=6 * 328)}
    p = place(SMALL, [CPU, GPU, NPU], CHAT, "auto", load=busy)
    assert p.device_id != "npu:0"
    assert "npu:0 is busy (6 queued, 1 active" in p.reason and "spills to" in p.reason
    npu_alt = next(a for a in p.alternatives if a.device_id == "npu:0")
    assert npu_alt.feasible and npu_alt.predicted_total_s > p.alternatives[0].predicted_total_s


def test_short_queue_on_a_fast_preferred_device_does_not_spill():
    one_core = DeviceInfo(
        "cpu", "1-core CPU", 32 * GB, ("torch", "onnxruntime-genai"), ("CPUExecutionProvider",),
        details={"physical_cores": 1},
    )  # fmt: skip
    load = {"npu:0": DeviceLoad(queued_requests=1, queued_tokens=20)}
    p = place(SMALL, [one_core, NPU], CHAT, "auto", load=load)
    assert p.device_id == "npu:0" and "spills" not in p.reason


def test_queue_wait_is_part_of_latency():
    quiet = place(SMALL, [CPU, NPU], CHAT, "latency")
    busy = place(SMALL, [CPU, NPU], CHAT, "latency", load={quiet.device_id: DeviceLoad(queued_requests=20)})
    assert busy.device_id != quiet.device_id


def test_active_requests_slow_a_device_down():
    idle = place(SMALL, [CPU], CHAT, "cpu")
    loaded = place(SMALL, [CPU], CHAT, "cpu", load={"cpu:0": DeviceLoad(active_requests=3)})
    assert loaded.predicted_tokens_per_s < idle.predicted_tokens_per_s


def test_unhealthy_device_is_skipped_with_reason():
    load = {"npu:0": DeviceLoad(healthy=False, unhealthy_reason="QNN context lost (retry in 20s)")}
    p = place(SMALL, [CPU, GPU, NPU], CHAT, "auto", load=load)
    assert p.device_id == "gpu:0"
    npu_alt = next(a for a in p.alternatives if a.device_id == "npu:0")
    assert not npu_alt.feasible and "QNN context lost" in npu_alt.why
    with pytest.raises(PlacementError, match="unhealthy"):
        place(SMALL, [CPU, GPU, NPU], CHAT, "npu", load=load)


def test_excluded_device_is_skipped():
    p = place(SMALL, [CPU, GPU, NPU], CHAT, "auto", exclude=["npu:0"])
    assert p.device_id == "gpu:0"
    p2 = place(SMALL, [CPU, GPU, NPU], CHAT, "auto", exclude=["npu:0", "gpu:0"])
    assert p2.device_id == "cpu:0"
    with pytest.raises(PlacementError, match="excluded"):
        place(SMALL, [CPU, GPU, NPU], CHAT, "auto", exclude=["npu:0", "gpu:0", "cpu:0"])
    with pytest.raises(PlacementError, match="pins the NPU"):
        place(SMALL, [CPU, GPU, NPU], CHAT, "npu", exclude=["npu:0"])


def test_two_gpus_spread_by_load():
    gpu1 = DeviceInfo(
        "gpu", "Test GPU", 24 * GB, ("torch",), ("CUDAExecutionProvider",), index=1, details={"bf16": True}
    )
    p = place(LARGE, [CPU, GPU, gpu1], CHAT, "gpu", load={"gpu:0": DeviceLoad(queued_requests=3)})
    assert p.device_id == "gpu:1"


# ---- simulated devices ----------------------------------------------------------------------------


def test_simulated_devices_are_labelled_and_use_cpu_rates():
    sim_gpu, sim_npu = (
        replace(d, details={**d.details, "host_physical_cores": 8}) for d in parse_simulation("gpu:24GB,npu:8GB")
    )
    p = place(SMALL, [CPU, sim_gpu, sim_npu], CHAT, "auto")
    assert p.device_id == "npu:0" and p.simulated
    assert p.provider == "CPUExecutionProvider"
    assert "simulated" in p.reason and "runs on the CPU" in p.reason
    by_id = {a.device_id: a for a in p.alternatives}
    # same backend and precision as the CPU's own path, on the same cores: the same predictions
    assert device_profile(sim_npu) == device_profile(CPU)
    assert by_id["npu:0"].predicted_tokens_per_s == pytest.approx(by_id["cpu:0"].predicted_tokens_per_s)
    assert by_id["npu:0"].predicted_energy_j == pytest.approx(by_id["cpu:0"].predicted_energy_j)
    g = place(SMALL, [CPU, sim_gpu, sim_npu], CHAT, "gpu")
    assert g.simulated and g.provider == "CPUExecutionProvider" and g.backend == "torch"
    assert g.precision == "fp32"  # no bf16 information for this simulated GPU: torch on a CPU in fp32
    assert "simulated" in g.reason


def test_simulated_device_budget_is_bounded_by_host_ram():
    (sim_gpu,) = parse_simulation("gpu:80GB")
    small_host = DeviceInfo(
        "cpu", "Host", 16 * GB, ("torch", "onnxruntime-genai"), ("CPUExecutionProvider",), details={"bf16": True}
    )
    sim = replace(sim_gpu, details={**sim_gpu.details, "bf16": True})
    with pytest.raises(PlacementError, match="host RAM"):
        place(LARGE, [small_host, sim], CHAT, "gpu")


# ---- cost model -----------------------------------------------------------------------------------


def test_prior_decode_rate_is_bandwidth_over_weight_bytes():
    prof = device_profile(CPU)
    r = prior_rates(CPU, SMALL, "int4")
    assert r.decode_tps == pytest.approx(
        1 / (SMALL.weight_bytes("int4") / prof.bandwidth_bytes_s + prof.step_overhead_s)
    )
    assert r.prefill_tps == pytest.approx(prof.compute_flops_s / (2 * SMALL.num_parameters))
    assert prior_rates(CPU, SMALL, "fp32").decode_tps < r.decode_tps  # more bytes, slower
    assert prior_rates(GPU, LARGE, "bf16").decode_tps > prior_rates(CPU, LARGE, "bf16").decode_tps
    assert r.source == "device profile"


def test_ema_update(tmp_path):
    cm = CostModel(tmp_path / "costmodel.json", alpha=0.5)
    cm.observe(NPU, SMALL, decode_tps=100.0, prefill_tps=1000.0, precision="int4")
    cm.observe(NPU, SMALL, decode_tps=200.0, precision="int4")
    r = cm.rates(NPU, SMALL, "int4")
    assert r.decode_tps == pytest.approx(150.0)  # first sample replaces the prior, then 0.5*200 + 0.5*100
    assert r.prefill_tps == pytest.approx(1000.0)
    assert (r.decode_samples, r.prefill_samples) == (2, 1)
    assert "measured" in r.source
    # other precisions, models and devices keep their priors
    assert cm.rates(NPU, LARGE, "int4") == prior_rates(NPU, LARGE, "int4")
    assert cm.rates(CPU, SMALL, "int4") == prior_rates(CPU, SMALL, "int4")


def test_invalid_measurements_are_ignored(tmp_path):
    cm = CostModel(tmp_path / "c.json")
    cm.observe(CPU, SMALL, decode_tps=None, prefill_tps=0.0)
    cm.observe(CPU, SMALL, decode_tps=float("nan"), prefill_tps=-5)
    assert cm.rates(CPU, SMALL, "int4") == prior_rates(CPU, SMALL, "int4")
    assert not (tmp_path / "c.json").exists()


def test_persistence_round_trip(tmp_path):
    path = tmp_path / "sub" / "costmodel.json"
    cm = CostModel(path)
    cm.observe(GPU, LARGE, decode_tps=31.0, prefill_tps=2500.0, precision="bf16")
    assert not path.exists()  # observing is memory only: the engine saves off its event loop
    assert cm.save() is True and cm.save() is False  # nothing new to write the second time
    data = json.loads(path.read_text())
    assert data["version"] == 1 and "gpu:0" in data["entries"]
    again = CostModel.load(path)
    assert again.rates(GPU, LARGE, "bf16") == cm.rates(GPU, LARGE, "bf16")
    assert again.rates(GPU, LARGE, "bf16").decode_tps == pytest.approx(31.0)
    assert [p.name for p in path.parent.iterdir()] == ["costmodel.json"]  # no temp files left behind


def test_load_default_uses_accelserve_home(accelserve_home):
    cm = CostModel.load_default()
    assert cm.path == accelserve_home / "costmodel.json"
    cm.observe("cpu:0", SMALL, decode_tps=42.0)
    cm.save()
    assert (accelserve_home / "costmodel.json").exists()
    # an engine reports by device id without precision: the measurement still applies to that device
    assert CostModel.load_default().rates(CPU, SMALL, "int4").decode_tps == pytest.approx(42.0)


def test_corrupt_file_falls_back_to_priors(tmp_path, caplog):
    path = tmp_path / "costmodel.json"
    path.write_text("{not json")
    cm = CostModel.load(path)
    assert cm.rates(CPU, SMALL, "int4") == prior_rates(CPU, SMALL, "int4")
    assert "ignoring measured rates" in caplog.text
    cm.observe(CPU, SMALL, decode_tps=10.0)  # and it is overwritten with valid JSON
    cm.save()
    assert json.loads(path.read_text())["version"] == 1


def test_simulated_measurements_do_not_leak_into_a_real_device(tmp_path):
    (sim_npu,) = parse_simulation("npu:8GB")
    cm = CostModel(tmp_path / "c.json")
    cm.observe(sim_npu, SMALL, decode_tps=7.0, precision="int4")
    assert cm.rates(sim_npu, SMALL, "int4").decode_tps == pytest.approx(7.0)
    assert cm.rates(NPU, SMALL, "int4") == prior_rates(NPU, SMALL, "int4")
    cm.observe("npu:0", SMALL, decode_tps=9.0, simulated=True, precision="int4")
    assert cm.rates(sim_npu, SMALL, "int4").decode_tps == pytest.approx(0.3 * 9 + 0.7 * 7)


def test_measured_rates_change_the_placement(tmp_path):
    cm = CostModel(tmp_path / "c.json")
    assert place(SMALL, [CPU, NPU], CHAT, "latency", costs=cm).device_id == "cpu:0"
    for _ in range(5):
        cm.observe(CPU, SMALL, decode_tps=5.0, prefill_tps=50.0, precision="int4")
    p = place(SMALL, [CPU, NPU], CHAT, "latency", costs=cm)
    assert p.device_id == "npu:0"
    cpu_alt = next(a for a in p.alternatives if a.device_id == "cpu:0")
    assert cpu_alt.predicted_tokens_per_s == pytest.approx(5.0)


def test_cost_model_is_thread_safe(tmp_path):
    path = tmp_path / "c.json"
    cm = CostModel(path, alpha=0.1)

    def work():
        for _ in range(25):
            cm.observe(CPU, SMALL, decode_tps=50.0, prefill_tps=500.0, precision="int4")
            cm.rates(CPU, SMALL, "int4")
            cm.save()  # saves race with observations on other threads

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cm.save()
    r = CostModel.load(path).rates(CPU, SMALL, "int4")
    assert r.decode_samples == 200 and r.decode_tps == pytest.approx(50.0)


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        CostModel(alpha=0)


EMULATED_NPU = DeviceInfo(
    "npu",
    "Qualcomm HTP (emulated on x86-64)",
    16 * GB,
    ("onnxruntime-genai",),
    ("QNNExecutionProvider",),
    emulated=True,
)


def test_auto_never_prefers_an_emulated_npu_but_a_pinned_request_uses_it():
    auto = place(SMALL, [CPU, EMULATED_NPU], CHAT, "auto")
    assert auto.device_id == "cpu:0" and not auto.emulated
    assert "emulated on this CPU" in auto.reason and "only when pinned" in auto.reason
    assert place(SMALL, [CPU, EMULATED_NPU], CHAT, "latency").device_id == "cpu:0"  # its rates are the emulator's
    pinned = place(SMALL, [CPU, EMULATED_NPU], CHAT, "npu")
    assert pinned.device_id == "npu:0" and pinned.emulated and not pinned.simulated
    assert pinned.provider == "QNNExecutionProvider" and "is emulated" in pinned.reason
    # a real NPU of the same shape is still auto's first choice for a small model
    assert place(SMALL, [CPU, NPU], CHAT, "auto").device_id == "npu:0"
