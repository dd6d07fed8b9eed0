"""A short soak (the full one is `benchmarks/soak_server.py`): concurrent clients that finish, drop streams
mid-way and drop requests before their first token; nothing hangs and every slot is free afterwards."""

from __future__ import annotations

import asyncio
import time

from test_server import make_engine, running

from benchmarks.soak_server import soak
from plugin.models.resolve import resolve_model
from plugin.serve.limits import ServerLimits
from plugin.serve.server import create_app

from fakes import FakeBackend


def test_short_soak_leaves_nothing_behind(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_HOME", str(tmp_path))
    backend = FakeBackend("cpu", token_delay_s=0.005, words=24, capacity=4)
    engine = make_engine(resolve_model(tiny_llama), {"cpu": backend}, kinds=("cpu",))
    app = create_app({"tiny": engine}, limits=ServerLimits(max_streams_per_client=0))
    with engine, running(app) as url:
        report = asyncio.run(soak(url, "tiny", clients=8, seconds=4, hang_s=30))
        deadline = time.time() + 10
        while time.time() < deadline and (backend.active or any(d["active"] or d["waiting"] for d in engine.status())):
            time.sleep(0.05)
        status = engine.status()
    statuses = report.by_status()
    assert report.hung() == 0 and set(statuses) <= {"200", "dropped"}, statuses
    assert statuses.get("200", 0) >= 8 and statuses.get("dropped", 0) >= 1
    assert {o.action for o in report.outcomes} == {
        "full_stream",
        "drop_mid_stream",
        "drop_before_first",
        "non_streamed",
    }
    assert not backend.active and all(d["active"] == 0 and d["waiting"] == 0 for d in status), status
    assert dict(app.state.gate.streams) == {}
    assert backend.cancelled  # the drops really cancelled generations in the backend
