"""The `accelserve` command line, end to end on a tiny model through the real engine and backends."""

from __future__ import annotations

import json

import pytest

from plugin.serve.cli import main


def test_devices_json_lists_cpu_and_simulated(capsys, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_SIMULATE", "gpu:24GB,npu:8GB")
    assert main(["devices", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)
    kinds = {d["kind"]: d for d in devices}
    assert set(kinds) == {"cpu", "gpu", "npu"}
    assert kinds["cpu"]["simulated"] is False
    assert kinds["gpu"]["simulated"] is True and kinds["npu"]["simulated"] is True
    for d in devices:
        assert {"kind", "name", "memory_bytes", "backends", "providers", "simulated"} <= set(d)


def test_malformed_simulation_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_SIMULATE", "tpu:8GB")
    assert main(["devices"]) == 2
    err = capsys.readouterr().err
    assert "tpu" in err and "Traceback" not in err


def test_generate_json_on_simulated_npu(tiny_llama, accelserve_home, capsys, monkeypatch):
    """Tiny model: auto places it on the simulated NPU, which runs onnxruntime-genai on the CPU and says so."""
    monkeypatch.setenv("ACCELSERVE_SIMULATE", "npu:8GB")
    code = main(["-q", "generate", str(tiny_llama), "--prompt", "Hello", "--max-new-tokens", "5", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    p = out["placement"]
    assert p["device"] == "npu" and p["simulated"] is True
    assert p["backend"] == "onnxruntime-genai" and p["provider"] == "CPUExecutionProvider"
    assert p["reason"]
    assert out["metrics"]["new_tokens"] >= 1
    assert isinstance(out["text"], str)


def test_generate_pinned_absent_device_fails_clearly(tiny_llama, accelserve_home, capsys, monkeypatch):
    monkeypatch.delenv("ACCELSERVE_SIMULATE", raising=False)
    code = main(["generate", str(tiny_llama), "--prompt", "Hi", "--device", "gpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "gpu" in err.lower() and "ACCELSERVE_SIMULATE" in err


def test_generate_missing_model_fails_clearly(tmp_path, accelserve_home, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "Hi"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_default_model_answers_paris(capsys, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_SIMULATE", "gpu:24GB,npu:8GB")
    assert main(["-q", "generate", "default", "--prompt", "What is the capital of France?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"]
    assert out["placement"]["device"] == "npu" and out["placement"]["simulated"] is True
    assert out["placement"]["provider"] == "CPUExecutionProvider"


def test_generate_pinned_simulated_gpu_runs_torch_on_cpu(tiny_llama, accelserve_home, capsys, monkeypatch):
    monkeypatch.setenv("ACCELSERVE_SIMULATE", "gpu:24GB,npu:8GB")
    code = main(
        ["-q", "generate", str(tiny_llama), "--prompt", "Hello", "--max-new-tokens", "4", "--device", "gpu", "--json"]
    )
    assert code == 0
    p = json.loads(capsys.readouterr().out)["placement"]
    assert p["device"] == "gpu" and p["simulated"] is True
    assert p["backend"] == "torch" and p["provider"] == "cpu"


def test_export_then_cache_hit_with_output(tiny_llama, accelserve_home, tmp_path, capsys):
    out_dir = tmp_path / "exported"
    args = ["-q", "export", str(tiny_llama), "--target", "cpu", "--precision", "fp32", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cache_hit"] is False
    assert main([*args, "--output", str(out_dir)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["cache_hit"] is True and second["key"] == first["key"]
    assert (out_dir / "genai_config.json").is_file()


def test_export_bad_precision_for_target_is_a_clear_error(tiny_llama, accelserve_home, capsys):
    assert main(["export", str(tiny_llama), "--target", "npu", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "fp16" in err and "Traceback" not in err


def test_chat_page_refuses_an_open_bind_without_a_login(capsys, monkeypatch):
    """Checked before any model is loaded: the message names the fix."""
    monkeypatch.delenv("ACCELSERVE_CHAT_AUTH", raising=False)
    monkeypatch.setattr("plugin.engine.engine.Engine.from_pretrained", _must_not_load)
    assert main(["chat", "--host", "0.0.0.0"]) != 0
    assert "--auth USER:PASSWORD" in capsys.readouterr().err
    assert main(["chat", "--host", "0.0.0.0", "--auth", "nopassword"]) != 0
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_chat_login_rules():
    from demos.chat import chat_auth

    assert chat_auth("127.0.0.1", None, allow_insecure=False) is None
    assert chat_auth("0.0.0.0", "ann:s3cret:x", allow_insecure=False) == ("ann", "s3cret:x")
    assert chat_auth("0.0.0.0", None, allow_insecure=True) is None


def test_serve_refuses_nonsense_limits_before_loading(capsys, monkeypatch):
    monkeypatch.setattr("plugin.engine.engine.Engine.from_pretrained", _must_not_load)
    assert main(["serve", "--max-queue", "0"]) != 0
    assert "max_queue must be an integer >= 1" in capsys.readouterr().err


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the settings were checked")


def test_serve_refuses_an_unknown_cpu_backend_before_loading(capsys, monkeypatch):
    monkeypatch.setattr("plugin.engine.devices.discover_devices", lambda: [])
    assert main(["serve", "--cpu-backend", "llamacpp"]) != 0
    assert "unknown cpu_backend 'llamacpp'" in capsys.readouterr().err
