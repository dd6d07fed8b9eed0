"""A process serving a cached ONNX export reads what it needs from memos, never importing torch: the
model's profile (plugin/models/resolve.py) and the libraries' architecture facts
(plugin/convert/library_facts.py), each keyed so that any change is a miss."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.convert import library_facts as facts_module
from plugin.models import resolve as resolve_module
from plugin.models.resolve import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _no_config_reading(*_args, **_kwargs):
    raise AssertionError("the config was read through transformers although the memo holds the profile")


def test_a_resolved_folder_is_profiled_once(tiny_llama, accelserve_home, monkeypatch, tmp_path):
    first = resolve_model(tiny_llama)
    monkeypatch.setattr(resolve_module, "_load_config", _no_config_reading)
    again = resolve_model(tiny_llama)
    assert again.profile == first.profile and again.path == first.path

    copy = tmp_path / "edited"
    shutil.copytree(tiny_llama, copy)
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] = 128
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(AssertionError, match="read through transformers"):  # an edited config is a miss
        resolve_model(copy)
    monkeypatch.undo()
    assert resolve_model(copy).profile.context_length == 128


def test_a_corrupt_profile_memo_is_read_again(tiny_llama, accelserve_home, caplog):
    first = resolve_model(tiny_llama)
    (memo,) = (accelserve_home / "memo" / "profiles").glob("*.json")
    memo.write_text("{not json")
    assert resolve_model(tiny_llama).profile == first.profile
    assert "unreadable profile memo" in caplog.text
    assert json.loads(memo.read_text())["num_parameters"] == first.profile.num_parameters  # rewritten


def test_library_facts_come_from_the_memo_until_a_version_changes(accelserve_home, monkeypatch, caplog):
    facts_module.library_facts.cache_clear()
    computed = facts_module.library_facts()
    assert "llama" in computed.optimum_types and computed.causal_lm_classes["llama"] == "LlamaForCausalLM"
    path = facts_module.memo_path(computed.versions)
    assert path.is_file()

    facts_module.library_facts.cache_clear()
    monkeypatch.setattr(facts_module, "_compute", lambda versions: pytest.fail("recomputed despite the memo"))
    assert facts_module.library_facts() == computed

    facts_module.library_facts.cache_clear()
    monkeypatch.setattr(facts_module, "_versions", lambda: {**computed.versions, "transformers": "0.0.0"})
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # another version: a miss
        facts_module.library_facts()

    facts_module.library_facts.cache_clear()
    monkeypatch.setattr(facts_module, "_versions", lambda: computed.versions)
    path.write_text("[1, 2")
    monkeypatch.setattr(facts_module, "_compute", lambda versions: computed)
    assert facts_module.library_facts() == computed
    assert "unreadable library-facts memo" in caplog.text
    facts_module.library_facts.cache_clear()


WARM_PROCESS = """
import json, sys
from plugin.engine.devices import parse_simulation
from plugin.engine.engine import Engine
from plugin.models.resolve import resolve_model

with Engine(resolve_model(sys.argv[1]), devices=parse_simulation("npu:1GB")) as engine:
    reply = engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0.0)
heavy = sorted(m for m in ("torch", "transformers", "optimum", "onnx") if m in sys.modules)
print(json.dumps({"backend": reply.placement.backend, "heavy": heavy}))
"""


def test_a_warm_serving_process_never_imports_torch(tiny_llama, accelserve_home):
    from plugin.convert import export

    facts_module.library_facts.cache_clear()  # memoise the facts under this test's home
    export(tiny_llama, target="cpu", precision="int4", progress=False)  # as serving exports it
    resolve_model(tiny_llama)
    out = subprocess.run(
        [sys.executable, "-c", WARM_PROCESS, str(tiny_llama)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"backend": "onnxruntime-genai", "heavy": []}, out.stderr[-2000:]


def test_serving_commands_cap_malloc_arenas_and_a_users_setting_wins(monkeypatch):
    from plugin.serve import cli
    from plugin.serve.malloc_arenas import cap_malloc_arenas

    calls = []
    monkeypatch.setattr(cli, "cap_malloc_arenas", lambda: calls.append(True) or True)
    assert cli.main(["devices", "--json"]) == 0
    assert calls == []  # only serve, chat and generate cap them
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert cap_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert cap_malloc_arenas() is (sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()))
