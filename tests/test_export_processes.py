"""Export across processes: two processes exporting one key, and a process killed mid-export."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from plugin.convert import export, verify_export


def _export_in_child(src: str, home: str, queue) -> None:
    os.environ["ACCELSERVE_HOME"] = home
    try:
        e = export(src, target="cpu", precision="int4", parity=False, progress=False)
        queue.put(("ok", str(e.path), e.cache_hit, e.key))
    except BaseException as exc:
        queue.put(("error", repr(exc), None, None))


def _die_mid_export(src: str, home: str) -> None:
    """Start an export and hard-exit during quantization, as a killed process would (no cleanup runs)."""
    import plugin.convert.quantize as quantize

    def killed(*a, **k):
        os._exit(9)

    quantize.convert_precision = killed
    export(src, target="cpu", precision="int4", parity=False, progress=False, home=Path(home), graph="plain")


def test_two_processes_exporting_one_key(tiny_llama, accelserve_home):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_export_in_child, args=(str(tiny_llama), str(accelserve_home), queue)) for _ in "ab"]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    assert len({r[1] for r in results}) == 1 and len({r[3] for r in results}) == 1
    assert sorted(r[2] for r in results) == [False, True]  # exactly one did the work
    assert verify_export(Path(results[0][1])) == []
    exports = accelserve_home / "exports"
    assert [p.name for p in exports.iterdir() if not p.name.startswith(".")] == [Path(results[0][1]).name]
    assert list(exports.glob(".*.partial-*")) == []


def test_killed_export_leaves_nothing_finished(tiny_llama, accelserve_home):
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_die_mid_export, args=(str(tiny_llama), str(accelserve_home)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 9
    exports = accelserve_home / "exports"
    leftovers = list(exports.glob(".*.partial-*"))
    assert leftovers, "the killed process should have left its temp folder behind"
    assert [p.name for p in exports.iterdir() if not p.name.startswith(".")] == []
    assert list(exports.rglob("manifest.json")) == []
    # the next export of the same key cleans up and succeeds
    done = export(
        tiny_llama, target="cpu", precision="int4", parity=False, progress=False, home=accelserve_home, graph="plain"
    )
    assert not done.cache_hit and verify_export(done.path) == []
    assert list(exports.glob(".*.partial-*")) == []
