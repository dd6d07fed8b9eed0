"""Device inventory: simulation specs, and discovery against fake torch / NVML / onnxruntime modules."""

from __future__ import annotations

import json
from enum import Enum
from types import SimpleNamespace as NS

import pytest
from rich.console import Console

from plugin.engine import devices as devmod
from plugin.engine.devices import (
    DeviceInfo,
    DeviceSpecError,
    devices_to_json,
    discover_cpu,
    discover_devices,
    discover_gpus,
    discover_npus,
    format_devices_table,
    parse_cpuinfo,
    parse_simulation,
)

# ---- simulation -----------------------------------------------------------------------------------


def test_parse_simulation_labels_devices_as_cpu_executed():
    gpu, npu = parse_simulation("gpu:24GB,npu:8GB")
    assert (gpu.kind, gpu.memory_bytes, gpu.id) == ("gpu", 24 * 10**9, "gpu:0")
    assert (npu.kind, npu.memory_bytes, npu.id) == ("npu", 8 * 10**9, "npu:0")
    for d in (gpu, npu):
        assert d.simulated is True
        assert d.providers == ("CPUExecutionProvider",)
        assert "runs on CPU" in d.name and d.name.startswith("Simulated")
    assert gpu.backends == ("torch",)
    assert npu.backends == ("onnxruntime-genai",)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gpu:1.5GiB", [int(1.5 * 2**30)]),
        ("GPU:512mib", [512 * 2**20]),
        (" gpu:8GB , gpu:16GB ", [8 * 10**9, 16 * 10**9]),
        ("npu:2TB", [2 * 10**12]),
    ],
)
def test_parse_simulation_units_and_repeats(spec, expected):
    devs = parse_simulation(spec)
    assert [d.memory_bytes for d in devs] == expected
    assert [d.index for d in devs] == list(range(len(expected)))


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_simulation_means_none(spec):
    assert parse_simulation(spec) == []


@pytest.mark.parametrize(
    "spec", ["gpu", "gpu:abc", "tpu:8GB", "gpu:0GB", "gpu:8GB,,npu", "cpu:8GB", "gpu:8XB", "gpu:-1GB", "gpu:8"]
)
def test_malformed_simulation_names_the_syntax(spec):
    with pytest.raises(DeviceSpecError) as e:
        parse_simulation(spec)
    msg = str(e.value)
    assert "ACCELSERVE_SIMULATE=<kind>:<memory>" in msg
    assert "gpu:24GB,npu:8GB" in msg


def test_discover_rejects_bad_env_spec(monkeypatch):
    monkeypatch.setenv("ACCELSERVE_SIMULATE", "tpu:8GB")
    with pytest.raises(DeviceSpecError, match="unknown device kind 'tpu'"):
        discover_devices()


# ---- fakes ----------------------------------------------------------------------------------------


class HwType(Enum):
    CPU = 0
    GPU = 1
    NPU = 2


def hw(kind: str, vendor: str = "Qualcomm", device_id: int = 1, **meta) -> NS:
    return NS(type=HwType[kind], vendor=vendor, vendor_id=0x4D4F4351, device_id=device_id, metadata=meta)


def ep(name: str, device: NS, vendor: str = "Microsoft") -> NS:
    return NS(ep_name=name, ep_vendor=vendor, device=device)


def fake_ort(ep_devices=(), providers=("CPUExecutionProvider",)) -> NS:
    return NS(
        __version__="1.32.0", get_ep_devices=lambda: list(ep_devices), get_available_providers=lambda: list(providers)
    )


def fake_og(qnn=True, openvino=True) -> NS:
    return NS(is_qnn_available=lambda: qnn, is_openvino_available=lambda: openvino)


def fake_torch(gpus: list[dict], available: bool = True, hip: str | None = None) -> NS:
    def props(i):
        return NS(**gpus[i])

    cuda = NS(is_available=lambda: available, device_count=lambda: len(gpus), get_device_properties=props)
    return NS(cuda=cuda, version=NS(cuda="12.8", hip=hip))


A100 = dict(name="NVIDIA A100-SXM4-40GB", total_memory=40 * 2**30, major=8, minor=0, multi_processor_count=108,
            uuid="aaaa-1111")  # fmt: skip
T4 = dict(name="Tesla T4", total_memory=16 * 2**30, major=7, minor=5, multi_processor_count=40, uuid="bbbb-2222")


class FakeNvml:
    """Reports GPUs in a different order from torch, so matching must use the uuid."""

    def __init__(self, entries: list[tuple[str, int]]):
        self.entries = entries
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self):
        return b"570.1"

    def nvmlDeviceGetCount(self):
        return len(self.entries)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return "GPU-" + self.entries[h][0]

    def nvmlDeviceGetMemoryInfo(self, h):
        return NS(free=self.entries[h][1], total=0, used=0)


# ---- GPUs -----------------------------------------------------------------------------------------


def test_gpus_from_torch_with_nvml_free_memory_matched_by_uuid():
    nvml = FakeNvml([("bbbb-2222", 15 * 10**9), ("aaaa-1111", 39 * 10**9)])
    a100, t4 = discover_gpus(fake_torch([A100, T4]), nvml)
    assert (a100.id, a100.name, a100.memory_bytes) == ("gpu:0", "NVIDIA A100-SXM4-40GB", 40 * 2**30)
    assert a100.details["capability"] == "8.0" and a100.details["bf16"] is True
    assert t4.details["capability"] == "7.5" and t4.details["bf16"] is False  # Turing: fp16 only
    assert a100.details["free_bytes"] == 39 * 10**9 and t4.details["free_bytes"] == 15 * 10**9
    assert a100.details["driver"] == "570.1"
    assert a100.providers == ("CUDAExecutionProvider",) and a100.backends == ("torch",)
    assert not a100.simulated
    assert nvml.shutdown


def test_no_cuda_means_no_gpu():
    assert discover_gpus(fake_torch([A100], available=False)) == []
    assert discover_gpus(None) == []


def test_broken_cuda_driver_is_logged_not_fatal(caplog):
    def boom():
        raise RuntimeError("CUDA driver version is insufficient")

    torch = NS(cuda=NS(is_available=boom), version=NS(cuda="12.8", hip=None))
    assert discover_gpus(torch) == []
    assert "insufficient" in caplog.text


def test_gpu_without_nvml_has_no_free_memory():
    (g,) = discover_gpus(fake_torch([A100]), None)
    assert "free_bytes" not in g.details


# ---- NPUs -----------------------------------------------------------------------------------------


def test_npus_from_ep_devices_qnn_and_openvino():
    qnn_hw = hw("NPU", "Qualcomm", 1, Description="Snapdragon X Elite - Qualcomm Hexagon NPU")
    intel_hw = hw("NPU", "Intel", 2)
    ort = fake_ort(
        [
            ep("CPUExecutionProvider", hw("CPU", "AMD")),
            ep("QNNExecutionProvider", qnn_hw, vendor="Qualcomm"),
            ep("OpenVINOExecutionProvider", intel_hw, vendor="Intel"),
            ep("DmlExecutionProvider", hw("GPU", "Intel", 3)),
        ],
        providers=("QNNExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"),
    )
    qnn, ov = discover_npus(ort, og=fake_og(qnn=True, openvino=True), machine="aarch64")
    assert qnn.name == "Snapdragon X Elite - Qualcomm Hexagon NPU"
    assert qnn.providers == ("QNNExecutionProvider",) and qnn.backends == ("onnxruntime-genai",)
    assert ov.providers == ("OpenVINOExecutionProvider",) and ov.name == "Intel NPU"
    assert [d.id for d in (qnn, ov)] == ["npu:0", "npu:1"]
    assert qnn.details["detected_by"] == "ep_devices"
    assert qnn.memory_bytes > 0 and qnn.details["shared_memory"] is True


def test_one_npu_reached_by_two_providers_is_one_device():
    npu = hw("NPU", "Intel", 7)
    ort = fake_ort([ep("OpenVINOExecutionProvider", npu), ep("VitisAIExecutionProvider", npu)])
    (d,) = discover_npus(ort, og=fake_og(), machine="x86_64")
    assert d.providers == ("OpenVINOExecutionProvider", "VitisAIExecutionProvider")
    assert d.details["genai_providers"] == ["OpenVINOExecutionProvider"]


def test_npu_that_genai_cannot_drive_has_no_backend():
    ort = fake_ort([ep("VitisAIExecutionProvider", hw("NPU", "AMD", 5))])
    (d,) = discover_npus(ort, og=fake_og(), machine="x86_64")
    assert d.backends == ()
    assert "VitisAIExecutionProvider" in d.details["note"]


def test_genai_build_flags_alone_never_create_an_npu():
    # onnxruntime-genai reports QNN/OpenVINO "available" on plain x86 builds: that is not hardware
    ort = fake_ort([ep("CPUExecutionProvider", hw("CPU", "AMD"))])
    assert discover_npus(ort, og=fake_og(qnn=True, openvino=True), machine="x86_64") == []


def test_qnn_provider_without_device_listing_needs_arm64():
    ort = fake_ort([], providers=("QNNExecutionProvider", "CPUExecutionProvider"))
    (d,) = discover_npus(ort, og=fake_og(), machine="ARM64")
    assert d.providers == ("QNNExecutionProvider",) and "Hexagon" in d.name
    assert d.details["detected_by"] == "provider QNNExecutionProvider installed"
    assert discover_npus(ort, og=fake_og(), machine="x86_64") == []


def test_openvino_provider_needs_openvino_to_list_an_npu():
    ort = fake_ort([], providers=("OpenVINOExecutionProvider",))

    def core(devices):
        return NS(available_devices=devices, get_property=lambda dev, prop: "Intel(R) AI Boost")

    with_npu = NS(Core=lambda: core(["CPU", "GPU", "NPU"]))
    (d,) = discover_npus(ort, og=fake_og(), openvino=with_npu, machine="x86_64")
    assert d.name == "Intel(R) AI Boost" and d.details["openvino_device"] == "NPU"
    without = NS(Core=lambda: core(["CPU", "GPU"]))
    assert discover_npus(ort, og=fake_og(), openvino=without, machine="x86_64") == []


def test_old_onnxruntime_without_ep_devices():
    ort = NS(__version__="1.18.0", get_available_providers=lambda: ["CPUExecutionProvider"])
    assert discover_npus(ort, og=fake_og(), machine="x86_64") == []


# ---- CPU ------------------------------------------------------------------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_x86():
    name, isa = parse_cpuinfo(X86_CPUINFO)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"AVX2", "AVX-512", "AVX512-BF16", "AMX", "AMX-BF16", "AMX-INT8", "FMA"} <= set(isa)
    assert "NEON" not in isa


def test_parse_cpuinfo_arm():
    _, isa = parse_cpuinfo(ARM_CPUINFO)
    assert {"NEON", "DOTPROD", "SVE", "I8MM", "BF16", "FP16"} <= set(isa)
    assert "AVX2" not in isa


def test_discover_cpu_from_cpuinfo_file(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(X86_CPUINFO)
    cpu = discover_cpu(f)
    assert cpu.kind == "cpu" and cpu.id == "cpu:0" and not cpu.simulated
    assert cpu.name == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.details["bf16"] is True and "AMX" in cpu.details["isa"]
    assert cpu.details["physical_cores"] >= 1 and cpu.details["logical_cores"] >= cpu.details["physical_cores"]
    assert cpu.memory_bytes > 0
    assert cpu.backends == ("torch", "onnxruntime-genai") and cpu.providers == ("CPUExecutionProvider",)


# ---- whole inventory ------------------------------------------------------------------------------


def patch_imports(monkeypatch, **modules):
    monkeypatch.setattr(devmod, "_import", lambda name: modules.get(name))


def test_discover_devices_adds_simulated_after_real(monkeypatch):
    patch_imports(monkeypatch, torch=fake_torch([A100]), onnxruntime=fake_ort(), onnxruntime_genai=fake_og())
    devs = discover_devices("gpu:24GB,npu:8GB")
    assert [d.id for d in devs] == ["gpu:0", "gpu:1", "npu:0", "cpu:0"]
    real_gpu, sim_gpu, sim_npu, cpu = devs
    assert not real_gpu.simulated and real_gpu.name.startswith("NVIDIA")
    assert sim_gpu.simulated and sim_gpu.providers == ("CPUExecutionProvider",)
    assert sim_npu.simulated and sim_npu.backends == ("onnxruntime-genai",)
    assert sim_gpu.details["bf16"] == cpu.details["bf16"]  # a simulated GPU is torch on this CPU
    assert sim_npu.details["host_physical_cores"] == cpu.details["physical_cores"]


def test_discover_devices_reads_env(monkeypatch):
    patch_imports(monkeypatch)  # nothing installed: CPU only
    monkeypatch.setenv("ACCELSERVE_SIMULATE", "npu:4GB")
    assert [(d.id, d.simulated) for d in discover_devices()] == [("npu:0", True), ("cpu:0", False)]
    assert [d.id for d in discover_devices(simulate="")] == ["cpu:0"]


def test_discover_devices_on_this_machine_always_has_one_real_cpu():
    devs = discover_devices(simulate="")
    cpus = [d for d in devs if d.kind == "cpu"]
    assert len(cpus) == 1 and not cpus[0].simulated
    assert all(not d.simulated for d in devs)


def test_table_and_json():
    devs = [*parse_simulation("gpu:24GB"), discover_cpu()]
    console = Console(record=True, width=200)
    console.print(format_devices_table(devs))
    text = console.export_text()
    assert "simulated: executes on the CPU" in text and "Simulated GPU (runs on CPU)" in text and "cpu:0" in text
    assert "24.0 GB" in text
    data = devices_to_json(devs)
    json.dumps(data)  # serialisable as is
    assert data[0]["id"] == "gpu:0" and data[0]["simulated"] is True
    assert data[0]["providers"] == ["CPUExecutionProvider"]
    assert set(data[1]) >= {"kind", "name", "memory_bytes", "backends", "providers", "simulated", "index", "details"}


def test_device_identity_ignores_details():
    a = DeviceInfo("npu", "x", 1, (), (), details={"a": 1})
    b = DeviceInfo("npu", "x", 1, (), (), details={"a": 2})
    assert a == b and a.id == "npu:0"


def test_devices_are_hashable_for_use_as_keys():
    gpu, npu = parse_simulation("gpu:8GB,npu:8GB")
    assert len({gpu, npu, gpu}) == 2


class FakeQnn:
    """backends.qnn_ep's surface as discovery uses it, on an x86-64 host (the HTP emulator)."""

    def __init__(self, emulated: bool = True, devices: int = 1) -> None:
        self.emulated, self.devices, self.registered = emulated, devices, 0

    def is_emulated(self) -> bool:
        return self.emulated

    def register(self) -> None:
        self.registered += 1

    def ep_devices(self) -> list[object]:
        return [object()] * self.devices


def test_qnn_emulator_is_an_npu_labelled_emulated_never_simulated():
    qnn = FakeQnn()
    (npu,) = devmod.discover_qnn_emulator(qnn, fake_og())
    assert npu.kind == "npu" and npu.emulated and not npu.simulated
    assert npu.providers == ("QNNExecutionProvider",) and npu.backends == ("onnxruntime-genai",)
    assert "emulated" in npu.name and npu.to_dict()["emulated"] is True
    assert qnn.registered == 1
    # on a Snapdragon the plugin lists a real NPU, which discover_npus reports; no emulator then
    assert devmod.discover_qnn_emulator(FakeQnn(emulated=False), fake_og()) == []
    assert devmod.discover_qnn_emulator(None, fake_og()) == []  # onnxruntime-qnn not installed


def test_emulated_npu_without_genai_qnn_support_says_why():
    (npu,) = devmod.discover_qnn_emulator(FakeQnn(), fake_og(qnn=False))
    assert npu.backends == () and "numerics, not speed" in npu.details["note"]
