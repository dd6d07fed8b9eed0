"""Build a cache folder once, atomically, even with several processes racing for it.

A folder counts as finished only when it holds the completion marker. It is built in a hidden temp folder
next to the target and renamed into place as the last step, under a file lock, so a crash or an error
leaves either nothing or a complete entry, never a half-written one that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".accelserve-complete.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Content hash of one file, read in 1 MiB chunks (the one hasher of every cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_complete(folder: Path) -> bool:
    """True when `folder` was finished by `build_once` (its marker exists)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text())


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _remove_leftovers(target: Path) -> None:
    """Under the lock no one else is building `target`: partial folders and an unmarked target are debris."""
    for stale in target.parent.glob(_partial_prefix(target) + "*"):
        log.warning("removing an unfinished build left by an interrupted process: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and not is_complete(target):
        log.warning("removing %s: it has no completion marker, so it was never finished", target)
        shutil.rmtree(target)


def build_once(target: Path, build: Callable[[Path], dict[str, Any]], *, what: str) -> Path:
    """Return `target`, building it first with `build(tmp_dir)` unless a finished copy exists.

    `build` writes everything into the folder it is given and returns facts to record in the marker.
    Any exception from `build` removes the temp folder and propagates unchanged.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building %s; waiting for it", target)
        lock.acquire()
    try:
        if is_complete(target):  # the other process finished while we waited
            return target
        _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_partial_prefix(target)))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a cache entry is readable like any folder
        start = time.perf_counter()
        try:
            facts = build(tmp)
            seconds = round(time.perf_counter() - start, 2)
            marker = {"what": what, "seconds": seconds, "created": time.time(), **(facts or {})}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, default=str))
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built %s in %.1f s: %s", what, seconds, target)
        return target
    finally:
        lock.release()
