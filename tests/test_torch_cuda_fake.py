"""The CUDA path without a GPU: `torch.cuda` monkeypatched into an inventory of two GPUs of different
capability and free memory. Checks what the code decides (device, precision, refusals, memory) and asks
of CUDA (set_device, device_map); nothing here executes a kernel, and nothing is labelled GPU that ran on
the CPU."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from backends import memory
from backends.base import BackendError
from backends.torch import backend as torch_backend
from backends.torch.backend import TorchBackend, resolve_precision
from backends.torch.batching import BatchRunner

MiB = 2**20


@dataclass
class FakeGPU:
    name: str
    capability: tuple[int, int]
    total: int
    free: int
    held: int = 0  # what this process's caching allocator holds there


@dataclass
class FakeCuda:
    gpus: list[FakeGPU]
    arch_list: list[str] = field(default_factory=lambda: ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"])
    set_device_calls: list[tuple[int, str]] = field(default_factory=list)

    def index(self, device: object) -> int:
        if isinstance(device, torch.device):
            return device.index or 0
        if isinstance(device, str):
            return int(device.partition(":")[2] or 0)
        return int(device or 0)

    def memory(self, device: object) -> tuple[int, int]:
        gpu = self.gpus[self.index(device)]
        return gpu.free, gpu.total

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.gpus))
        monkeypatch.setattr(cuda, "get_device_capability", lambda d=None: self.gpus[self.index(d)].capability)
        monkeypatch.setattr(cuda, "get_device_name", lambda d=None: self.gpus[self.index(d)].name)
        monkeypatch.setattr(
            cuda, "mem_get_info", lambda d=None: (self.gpus[self.index(d)].free, self.gpus[self.index(d)].total)
        )
        monkeypatch.setattr(cuda, "memory_reserved", lambda d=None: self.gpus[self.index(d)].held)
        monkeypatch.setattr(cuda, "get_arch_list", lambda: list(self.arch_list))
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(
            cuda, "set_device", lambda d: self.set_device_calls.append((self.index(d), threading.current_thread().name))
        )
        monkeypatch.setattr(torch.version, "hip", None)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """cuda:0 a Turing T4 (7.5, no bf16), cuda:1 an Ampere A10 (8.6); a fresh process-wide ledger."""
    fake = FakeCuda(
        [
            FakeGPU("Tesla T4 (fake)", (7, 5), total=16 * 1024 * MiB, free=15 * 1024 * MiB),
            FakeGPU("NVIDIA A10 (fake)", (8, 6), total=24 * 1024 * MiB, free=23 * 1024 * MiB),
        ]
    )
    fake.install(monkeypatch)
    monkeypatch.setattr(memory, "_ledgers", {})
    return fake


def test_bf16_only_at_capability_8_of_that_device(fake_cuda, caplog):
    t4, a10 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert resolve_precision("auto", t4) == "fp16"
    assert resolve_precision("auto", a10) == "bf16"
    with caplog.at_level("WARNING"):
        assert resolve_precision("bf16", t4) == "fp16"  # asked for bf16: emulated there, so fp16
    assert "compute capability 7.5" in caplog.text
    assert resolve_precision("bf16", a10) == "bf16"
    assert resolve_precision("fp32", t4) == "fp32"


def test_loader_passes_the_placements_device_index_and_precision(fake_cuda, tiny_model_factory):
    from plugin.engine.devices import DeviceInfo
    from plugin.engine.loaders import default_backend_factory
    from plugin.engine.scheduler import Placement
    from plugin.models.resolve import resolve_model

    model = resolve_model(tiny_model_factory("llama"))
    built = {}
    for index, planned in ((0, "bf16"), (1, "bf16"), (1, "fp16")):
        gpu = DeviceInfo(
            kind="gpu",
            name=fake_cuda.gpus[index].name,
            memory_bytes=fake_cuda.gpus[index].total,
            backends=("torch",),
            providers=(),
            index=index,
        )
        placement = Placement(
            device="gpu",
            device_id=gpu.id,
            backend="torch",
            provider="cuda",
            precision=planned,
            reason="test",
            simulated=False,
            predicted_ttft_s=0.0,
            predicted_tokens_per_s=0.0,
            alternatives=(),
        )
        b = default_backend_factory(model, placement, gpu)
        assert isinstance(b, TorchBackend)
        built[(index, planned)] = (str(b.device), b.precision, b.capabilities().provider, b.capabilities().device)
    assert built[(0, "bf16")] == ("cuda:0", "fp16", "cuda:0", "gpu")  # the T4 cannot run bf16 natively
    assert built[(1, "bf16")] == ("cuda:1", "bf16", "cuda:1", "gpu")
    assert built[(1, "fp16")] == ("cuda:1", "fp16", "cuda:1", "gpu")


def test_refuses_a_gpu_the_torch_build_has_no_kernels_for(fake_cuda, tiny_model_factory):
    fake_cuda.gpus.append(
        FakeGPU("RTX PRO 6000 Blackwell (fake)", (12, 0), total=96 * 1024 * MiB, free=90 * 1024 * MiB)
    )
    with pytest.raises(BackendError, match=r"cuda:2 .*compute capability 12\.0.*not supported by this torch build"):
        TorchBackend(tiny_model_factory("llama"), device="cuda:2")
    # PTX for an older architecture is compiled for newer GPUs at load time, so that build can run it
    fake_cuda.arch_list.append("compute_90")
    assert TorchBackend(tiny_model_factory("llama"), device="cuda:2").device == torch.device("cuda", 2)


@pytest.mark.parametrize(
    ("capability", "arch_list", "ok"),
    [
        ((8, 9), ["sm_80", "sm_86"], True),  # a cubin runs on later minors of its major
        ((8, 0), ["sm_86"], False),  # ... never on earlier ones
        ((9, 0), ["sm_80", "sm_86"], False),  # nor on another major
        ((9, 0), ["sm_90a"], True),
        ((10, 0), ["sm_90a"], False),  # arch-specific cubins run only on their own capability
        ((10, 0), ["sm_80", "compute_80"], True),  # PTX compiles forward
        ((7, 5), ["compute_80"], False),  # ... never backward
    ],
)
def test_architecture_rules(capability, arch_list, ok):
    assert torch_backend._arch_supported(*capability, arch_list) is ok


def test_the_runner_thread_sets_its_device(fake_cuda, tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    runner = BatchRunner(model, torch.device("cuda", 1), max_batch_size=2)
    runner.start()
    try:
        deadline = time.time() + 5
        while not fake_cuda.set_device_calls and time.time() < deadline:
            time.sleep(0.01)
        assert fake_cuda.set_device_calls == [(1, "torch-batch-scheduler")]
    finally:
        runner.stop("test over")


def test_load_goes_straight_to_the_placed_gpu_and_frees_its_reservation_on_failure(
    fake_cuda, tiny_model_factory, monkeypatch
):
    from transformers import AutoModelForCausalLM

    seen = {}

    def from_pretrained(folder, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here: the weights would now be read onto the GPU (fake)")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    backend = TorchBackend(tiny_model_factory("llama"), device="cuda:1", dtype="auto")
    with pytest.raises(BackendError, match="cannot load"):
        backend.load()
    assert seen["device_map"] == {"": torch.device("cuda", 1)}
    assert seen["dtype"] == torch.bfloat16
    assert torch_backend.device_ledger(torch.device("cuda", 1)).reservations() == []


def test_two_backends_on_one_gpu_never_reserve_more_than_free_minus_headroom(fake_cuda, tiny_model_factory):
    gpu = fake_cuda.gpus[0]
    gpu.total, gpu.free = 64 * MiB, 40 * MiB
    device = torch.device("cuda", 0)
    book = torch_backend.device_ledger(device)
    limit = gpu.free - book.headroom(gpu.total)  # nothing of ours is on it yet
    path = tiny_model_factory("llama")
    # a huge batch wants far more KV cache than the GPU has: the first backend takes what is left, no more
    first = TorchBackend(path, device="cuda:0", max_batch_size=1024)
    second = TorchBackend(path, device="cuda:0", max_batch_size=8)
    first._reservation = first._reserve()
    assert book.reserved() == first._reservation.total <= limit
    assert first._reservation.kv < first._max_kv_bytes()
    with pytest.raises(BackendError, match=r"does not fit.*reserved by other backends here \(torch"):
        second._reserve()
    assert book.reserved() <= limit
    # the second one fits once the first is gone
    first._release()
    second._reservation = second._reserve()
    assert second._reservation.kv == second._max_kv_bytes()  # a full batch at full context fits now
    assert book.reserved() <= limit
    # what is left follows live free memory: another process takes most of it, a third backend is refused
    gpu.free = 8 * MiB
    third = TorchBackend(path, device="cuda:0", max_batch_size=1024)
    with pytest.raises(BackendError, match="does not fit"):
        third._reserve()
    second._release()
    assert book.reservations() == []


def test_memory_this_process_already_holds_is_not_counted_twice(fake_cuda):
    gpu = fake_cuda.gpus[1]
    gpu.total, gpu.free = 100 * MiB, 80 * MiB
    book = torch_backend.device_ledger(torch.device("cuda", 1))
    headroom = book.headroom(gpu.total)
    a = book.reserve("a", weights=30 * MiB, activations=5 * MiB, min_kv=1 * MiB, max_kv=10 * MiB)
    assert a.total == 45 * MiB
    # the weights are now on the GPU: free memory dropped, and the allocator holds them
    gpu.free, gpu.held = 50 * MiB, 30 * MiB
    assert book.capacity() == 80 * MiB - headroom
    assert book.available() == 80 * MiB - headroom - 45 * MiB
    with pytest.raises(memory.LedgerError, match="reserved by other backends here"):
        book.reserve("b", weights=30 * MiB, activations=0, min_kv=1 * MiB, max_kv=1 * MiB)
    b = book.reserve("b", weights=20 * MiB, activations=0, min_kv=1 * MiB, max_kv=50 * MiB)
    assert book.reserved() == book.capacity()  # b took exactly what was left for its KV cache
    assert b.kv == 80 * MiB - headroom - 45 * MiB - 20 * MiB


def test_the_activation_allowance_is_part_of_what_must_fit(tiny_model_factory):
    path = tiny_model_factory("llama")
    probe = TorchBackend(path, device="cpu")
    weights, activations, one_seq, _ = probe._needs()
    assert activations > 0
    too_small = TorchBackend(path, device="cpu", memory_limit_bytes=weights + one_seq + activations // 2)
    with pytest.raises(BackendError, match=r"does not fit.*activations"):
        too_small.load()
    assert not too_small.health().healthy


def test_a_backend_dropped_without_unload_releases_its_reservation(fake_cuda, tiny_model_factory):
    import gc

    book = torch_backend.device_ledger(torch.device("cuda", 1))
    backend = TorchBackend(tiny_model_factory("llama"), device="cuda:1")
    backend._reservation = backend._reserve()
    assert [r.owner for r in book.reservations()] == [backend._owner]
    del backend
    gc.collect()
    assert book.reservations() == []
