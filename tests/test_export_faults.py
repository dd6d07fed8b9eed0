"""Fault injection on the export cache: a process killed at each step, a full disk while writing or
publishing. Each ends with a clear error (or a dead process) and a cache that is still valid: nothing
half-written is ever published, and the next export builds a verified entry."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from plugin.convert import ExportError, export, verify_export

EXPORT = {"target": "cpu", "precision": "fp32", "graph": "plain", "progress": False}


def _die_at(where: str, src: str, home: str) -> None:
    """Export, and hard-exit (no cleanup, as SIGKILL would) when `where` is reached."""
    import plugin.convert.cache as cache
    from plugin.convert.steps import StepTimer

    step = StepTimer.step

    def dying_step(self, name, description):
        if name == where:
            os._exit(9)
        return step(self, name, description)

    def dying_manifest(folder, manifest):  # half a manifest on disk, then death
        (Path(folder) / "manifest.json").write_text('{"manifest_version": ')
        os._exit(9)

    def dying_publish(tmp, target):
        os._exit(9)

    StepTimer.step = dying_step
    cache.write_manifest = dying_manifest if where == "manifest" else cache.write_manifest
    cache.publish = dying_publish if where == "publish" else cache.publish
    export(src, parity=True, home=Path(home), **EXPORT)


def finished_entries(home: Path) -> list[str]:
    return [p.name for p in (home / "exports").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("where", ["optimum_export", "genai_config", "parity", "manifest", "publish"])
def test_export_killed_at_each_step_leaves_a_valid_cache(where, tiny_llama, accelserve_home):
    proc = mp.get_context("spawn").Process(target=_die_at, args=(where, str(tiny_llama), str(accelserve_home)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 9, f"the export never reached {where}"
    assert finished_entries(accelserve_home) == []  # nothing half-built was published
    again = export(tiny_llama, parity=False, home=accelserve_home, **EXPORT)
    assert not again.cache_hit and verify_export(again.path) == []
    assert list((accelserve_home / "exports").glob(".*.partial-*")) == []  # the debris was cleaned up


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_is_a_clear_error_and_publishes_nothing(tiny_llama, accelserve_home, monkeypatch):
    import plugin.convert.cache as cache

    monkeypatch.setattr(cache, "write_manifest", _full_disk)
    with pytest.raises(ExportError, match=r"is full .* nothing was published.* larger disk"):
        export(tiny_llama, parity=False, home=accelserve_home, **EXPORT)
    exports = accelserve_home / "exports"
    assert finished_entries(accelserve_home) == [] and list(exports.glob(".*.partial-*")) == []
    monkeypatch.undo()
    assert verify_export(export(tiny_llama, parity=False, home=accelserve_home, **EXPORT).path) == []


def test_full_disk_while_copying_to_output_keeps_the_users_folder(tiny_llama, accelserve_home, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    first = export(tiny_llama, parity=False, home=accelserve_home, output=out, **EXPORT)
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    real_copytree = shutil.copytree

    def copy_until_full(src, dst, *a, **k):
        if str(src).endswith(".data"):
            Path(dst).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return shutil.copy2(src, dst, *a, **k)

    def copytree(src, dst, **kwargs):  # copytree gathers the per-file OSErrors into one shutil.Error
        return real_copytree(src, dst, copy_function=copy_until_full, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copytree)
    with pytest.raises(ExportError, match="is full"):
        export(tiny_llama, parity=False, home=accelserve_home, output=out, force=True, **EXPORT)
    monkeypatch.undo()
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before  # the user's folder is untouched
    assert verify_export(out) == [] and verify_export(first.path) == []
    assert list(tmp_path.glob(".out.partial-*")) == []  # no partial sibling left beside it
