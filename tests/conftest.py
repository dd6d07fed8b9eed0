"""Shared fixtures: tiny checkpoints per architecture, built once per session, and an isolated cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the rows kernel (backends/ort_genai/kernels) is built once per test session, not once per test's home
os.environ.setdefault("ACCELSERVE_KERNELS_DIR", tempfile.mkdtemp(prefix="accelserve-kernels-"))

from tiny_models import TINY_CONFIGS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Return a function arch -> folder of a tiny random checkpoint (cached per session)."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in TINY_CONFIGS:
            raise KeyError(f"no tiny config for {arch!r}; have {sorted(TINY_CONFIGS)}")
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture
def accelserve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ACCELSERVE_HOME so tests never touch the user's cache."""
    home = tmp_path / "accelserve-home"
    monkeypatch.setenv("ACCELSERVE_HOME", str(home))
    return home
