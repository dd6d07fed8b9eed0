"""The plugin seam: runtimes come from entry points, built-in and out-of-tree alike."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest

from backends import registry
from plugin.engine.scheduler import PlacementRequest, place

from fakes import device

ECHO_PACKAGE = '''
"""An out-of-tree runtime: serves any model on the CPU by echoing the prompt (a stand-in for a vendor SDK)."""
from backends.registry import HF_CHECKPOINT, BackendSpec


def _create(target):
    from fakes import FakeBackend

    backend = FakeBackend(target.device_kind)
    backend.model_path = target.model_path
    return backend


SPEC = BackendSpec(
    name="echo",
    devices=("cpu",),
    format=HF_CHECKPOINT,
    factory=_create,
    precisions=lambda kind, n, details: ["fp32"],
    priority={"cpu": -1},  # preferred over the built-in runtimes on the CPU
)
'''


@pytest.fixture
def echo_plugin(tmp_path, monkeypatch):
    """Install a tiny backend package the way pip would: the module plus a dist-info with its entry point."""
    site = tmp_path / "site"
    (site / "echo_backend").mkdir(parents=True)
    (site / "echo_backend" / "__init__.py").write_text(textwrap.dedent(ECHO_PACKAGE))
    info = site / "echo_backend-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-backend\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[accelserve.backends]\necho = echo_backend:SPEC\n")
    monkeypatch.syspath_prepend(str(site))
    yield registry.refresh()
    sys.modules.pop("echo_backend", None)
    monkeypatch.undo()
    registry.refresh()


def test_built_in_runtimes_register_through_entry_points():
    specs = registry.registered()
    assert {"onnxruntime-genai", "torch"} <= set(specs)
    assert specs["torch"].devices == ("gpu", "cpu") and specs["onnxruntime-genai"].format == registry.ONNX_GENAI


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(Exception, match="no backend named 'nope' is installed"):
        registry.get("nope")


def test_out_of_tree_backend_is_placed_and_serves(echo_plugin, tiny_llama, accelserve_home):
    assert "echo" in echo_plugin
    from plugin.engine.costmodel import CostModel
    from plugin.engine.engine import Engine
    from plugin.models.resolve import resolve_model

    model = resolve_model(tiny_llama)
    cpu = device("cpu")
    cpu = dataclasses.replace(cpu, backends=(*cpu.backends, "echo"))  # the CPU reaches the new runtime
    placement = place(model.profile, [cpu], PlacementRequest(prompt_tokens=5, max_new_tokens=8))
    assert placement.backend == "echo" and placement.precision == "fp32"
    with Engine(model, devices=[cpu], cost_model=CostModel(path=None)) as engine:
        reply = engine.chat([{"role": "user", "content": "plugins work"}])
    assert reply.text == "echo: plugins work" and reply.placement.backend == "echo"


def test_a_device_no_runtime_reaches_is_infeasible_with_the_reason(tiny_llama, accelserve_home):
    from plugin.models.resolve import resolve_model

    model = resolve_model(tiny_llama)
    cpu = device("cpu")
    npu = dataclasses.replace(device("npu"), backends=())
    placement = place(model.profile, [cpu, npu], PlacementRequest(prompt_tokens=5, max_new_tokens=8), "auto")
    why = next(a.why for a in placement.alternatives if a.device_id == "npu:0")
    assert "needs the onnxruntime-genai runtime" in why
