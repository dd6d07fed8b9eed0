"""The chat page's Gradio endpoints have names gradio_client users can call (no browser needed)."""

from __future__ import annotations

import socket

import pytest

from demos.chat import build_app
from plugin.engine.costmodel import CostModel
from plugin.engine.engine import Engine
from plugin.models.resolve import resolve_model

from fakes import FakeBackend, device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page(tiny_llama, accelserve_home):
    engine = Engine(
        resolve_model(tiny_llama),
        devices=[device("cpu"), device("npu")],
        backend_factory=lambda model, placement, dev: FakeBackend(dev.kind),
        cost_model=CostModel(path=None),
    )
    app = build_app(engine)
    port = free_port()
    app.queue(default_concurrency_limit=None).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
        engine.close()


def test_named_endpoints_answer_through_gradio_client(page):
    from gradio_client import Client

    client = Client(page, verbose=False)
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/chat", "/stop", "/new_chat", "/inventory"} <= named
    assert not any(name.startswith("/lambda") for name in named)
    history, _ = client.predict("hello api", [], "auto", 16, 0.0, 1.0, api_name="/chat")
    assert "echo: hello api" in str(history[-1])
    assert "npu:0" in client.predict(api_name="/inventory")


def test_inventory_says_how_each_device_executes(tiny_llama, accelserve_home):
    import dataclasses

    from demos.chat import inventory_markdown

    emulated = dataclasses.replace(device("npu", simulated=False), emulated=True, index=0)
    engine = Engine(
        resolve_model(tiny_llama),
        devices=[device("cpu"), emulated, device("gpu")],
        backend_factory=lambda model, placement, dev: FakeBackend(dev.kind),
        cost_model=CostModel(path=None),
    )
    with engine:
        rows = {line.split(" | ")[0].strip("| "): line for line in inventory_markdown(engine).splitlines()[2:]}
    assert "| real |" in rows["cpu:0"] and "emulated (on the CPU)" in rows["npu:0"]
    assert "simulated (on the CPU)" in rows["gpu:0"]
