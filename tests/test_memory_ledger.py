"""One memory ledger per device, used by everyone: the backends reserve in it on load and release on unload,
the scheduler refuses (or places elsewhere) when it is full, and the engine's residency unloads idle backends
by what it has left. Device inventories and free memory are made up; no test depends on this machine's RAM."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import memory
from backends.base import BackendError
from backends.memory import MemoryLedger, host_ledger, load_need
from backends.ort_genai.backend import OrtGenaiBackend
from backends.ort_genai.memory import BATCHED_KV_SLACK, weight_file_bytes
from backends.torch.backend import TorchBackend
from plugin.engine.costmodel import CostModel
from plugin.engine.engine import Engine
from plugin.engine.scheduler import DeviceLoad, PlacementError, PlacementRequest, place
from plugin.models.resolve import resolve_model

from fakes import FakeBackend, device

MiB = 2**20
CHAT = PlacementRequest(prompt_tokens=40, max_new_tokens=40)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A fresh set of process-wide ledgers whose host RAM is made up: free, total and what this process holds."""
    state = {"free": 1000 * MiB, "total": 1200 * MiB, "held": 0}
    monkeypatch.setattr(memory, "_ledgers", {})
    monkeypatch.setattr(memory, "host_memory", lambda: (state["free"], state["total"], state["held"]))
    return state


@pytest.fixture(scope="module")
def ort_export(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from plugin.convert import export

    home = tmp_path_factory.mktemp("home-ledger")
    return export(str(tiny_model_factory("llama")), target="cpu", precision="fp32", home=home).path


# ---- the backends reserve on load and release on unload ------------------------------------------------------


def test_ort_backend_reserves_weights_and_kv_on_load_and_reports_its_kv_budget(host, ort_export):
    backend = OrtGenaiBackend(ort_export, device="cpu")
    backend.load()
    try:
        (reservation,) = host_ledger().reservations()
        assert reservation is backend.reservation and reservation.owner.startswith("onnxruntime-genai")
        assert reservation.weights == weight_file_bytes(ort_export) > 0
        assert reservation.activations > 0 and reservation.kv > 0
        caps = backend.capabilities()
        assert caps.kv_bytes_per_token > 0
        # batched: the engine's admission gets what the buffers can hold without exceeding the reservation
        assert caps.kv_budget_bytes == int(reservation.kv / BATCHED_KV_SLACK)
    finally:
        backend.unload()
    assert host_ledger().reservations() == [] and backend.reservation is None


def test_torch_and_ort_on_one_memory_never_reserve_more_than_free_minus_headroom(host, ort_export, tiny_llama):
    book = host_ledger()
    torch_backend = TorchBackend(tiny_llama, device="cpu")
    torch_backend.load()
    ort = OrtGenaiBackend(ort_export, device="cpu")
    try:
        assert book.reserved() <= book.capacity()
        host["free"] = book.reserved() + book.headroom(host["total"]) + 64 * 1024  # almost nothing left
        with pytest.raises(BackendError, match=r"does not fit in memory.*reserved by other backends here \(torch"):
            ort.load()
        assert [r.owner for r in book.reservations()] == [torch_backend.reservation.owner]
        host["free"] = book.reserved() + book.headroom(host["total"]) + 40 * MiB
        ort.load()
        assert book.reserved() <= book.capacity()  # the second took what was left, not the same free bytes
        assert len(book.reservations()) == 2
    finally:
        ort.unload()
        torch_backend.unload()
    assert book.reservations() == []


# ---- the scheduler reads the ledger ---------------------------------------------------------------------------


def test_scheduler_places_elsewhere_or_refuses_when_the_ledger_is_full(tiny_llama):
    profile = resolve_model(tiny_llama).profile
    gpu, cpu = device("gpu", gb=24, simulated=False), device("cpu", gb=64)
    assert place(profile, [cpu, gpu], CHAT, "auto").device_id == "gpu:0"
    full = {"gpu:0": DeviceLoad(memory_available_bytes=1024)}
    moved = place(profile, [cpu, gpu], CHAT, "auto", load=full)
    assert moved.device_id == "cpu:0"
    (gpu_alt,) = [a for a in moved.alternatives if a.device_id == "gpu:0"]
    assert not gpu_alt.feasible and "memory ledger has left now" in gpu_alt.why and "budget is 1.0 KB" in gpu_alt.why
    with pytest.raises(PlacementError, match="memory ledger has left now"):
        place(profile, [cpu, gpu], CHAT, "gpu", load=full)
    roomy = {"gpu:0": DeviceLoad(memory_available_bytes=100 * 2**30)}  # never more than the device's own budget
    assert "90% of 25.8 GB" in place(profile, [cpu, gpu], CHAT, "gpu", load=roomy).reason


class _Book:
    """A made-up device memory: capacity bytes, nothing held by the process."""

    def __init__(self, capacity: int) -> None:
        # headroom is 25 % of total: free 2c of total 4c leaves exactly c to reserve
        self.ledger = MemoryLedger("fake", "cpu", lambda: (2 * capacity, 4 * capacity, 0))


class ReservingBackend(FakeBackend):
    """A fake backend that reserves `size` bytes in its device's ledger while loaded, like the real ones."""

    def __init__(self, kind: str, book: MemoryLedger, size: int) -> None:
        super().__init__(kind)
        self.book, self.size, self.reservation = book, size, None

    def load(self) -> None:
        super().load()
        self.reservation = self.book.reserve(
            f"fake {self.device_kind}", weights=self.size, activations=0, min_kv=0, max_kv=0
        )

    def unload(self) -> None:
        super().unload()
        self.book.release(f"fake {self.device_kind}")
        self.reservation = None


def test_engine_routes_away_from_a_full_ledger_and_back_once_it_is_released(tiny_llama, accelserve_home):
    gpu_book, cpu_book = _Book(64 * 2**30).ledger, _Book(64 * 2**30).ledger
    devices = [device("cpu", gb=64), device("gpu", gb=24)]
    books = {"gpu": gpu_book, "cpu": cpu_book}
    engine = Engine(
        resolve_model(tiny_llama),
        devices=devices,
        backend_factory=lambda model, placement, dev: FakeBackend(dev.kind),
        cost_model=CostModel(path=None),
        ledgers=lambda d: books[d.kind],
        policy="latency",
    )
    with engine:
        other = gpu_book.reserve("another model", weights=gpu_book.capacity() - 1024, activations=0, min_kv=0, max_kv=0)
        reply = engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=8, policy="auto")
        assert reply.placement.device_id == "cpu:0"
        assert "gpu:0" in reply.placement.reason and "memory ledger has left now" in reply.placement.reason
        gpu_book.release(other.owner)
        assert (
            engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=8, policy="auto").placement.device_id
            == "gpu:0"
        )


def test_residency_unloads_an_idle_backend_sharing_the_ledger_to_make_room(tiny_llama, accelserve_home):
    model = resolve_model(tiny_llama)
    need = max(load_need(model.profile, p, max_batch=8) for p in ("int4", "fp32", "bf16"))
    book = _Book(int(need * 1.6)).ledger  # room for one resident backend, not two
    made: dict[str, ReservingBackend] = {}

    def factory(resolved, placement, dev):
        made[dev.kind] = ReservingBackend(dev.kind, book, int(need * 1.5))
        return made[dev.kind]

    devices = [device("cpu", gb=64), device("gpu", gb=24), device("npu", gb=8)]  # simulated: all in host RAM
    engine = Engine(
        model, devices=devices, backend_factory=factory, cost_model=CostModel(path=None), ledgers=lambda d: book
    )
    with engine:
        assert (
            engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=8, policy="npu").placement.device == "npu"
        )
        assert [r.owner for r in book.reservations()] == ["fake npu"]
        # the GPU shares the NPU's memory: the idle NPU backend is unloaded (and releases) to make room
        assert (
            engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=8, policy="gpu").placement.device == "gpu"
        )
        assert not made["npu"].loaded and made["gpu"].loaded
        assert [r.owner for r in book.reservations()] == ["fake gpu"]
    assert book.reservations() == []  # closing the engine unloads, and unloading releases
