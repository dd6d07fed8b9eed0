"""The HTTP API fuzzed from its own OpenAPI schema (small here; `benchmarks/fuzz_api.py` runs it full-size)."""

from __future__ import annotations

import pytest
from test_server import make_engine, running

from benchmarks.fuzz_api import fuzz
from plugin.models.resolve import resolve_model
from plugin.serve.limits import ServerLimits
from plugin.serve.server import create_app


def test_generated_requests_never_break_the_server(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_HOME", str(tmp_path))
    engine = make_engine(resolve_model(tiny_llama), {}, kinds=("cpu", "npu"))
    with engine, running(create_app({"tiny": engine}, limits=ServerLimits(request_timeout_s=30))) as url:
        report = fuzz(url, examples=40)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /health"} <= set(report.operations)
    assert report.requests >= 40 and sum(report.statuses.values()) == report.requests
    assert report.server_errors == [] and report.connection_errors == []
    assert not report.unhealthy_after
    assert "200" in report.statuses and any(s.startswith("4") for s in report.statuses)  # both kinds reached


@pytest.mark.parametrize("label", ["POST /v1/chat/completions"])
def test_the_schema_documents_the_generation_routes(tiny_llama, tmp_path, monkeypatch, label):
    monkeypatch.setenv("ACCELSERVE_HOME", str(tmp_path))
    engine = make_engine(resolve_model(tiny_llama), {})
    with engine, running(create_app({"tiny": engine})) as url:
        import httpx

        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    method, path = label.split()
    assert method.lower() in paths[path]
