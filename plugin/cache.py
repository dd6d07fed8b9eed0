"""Build cache folders once, atomically, even with several processes racing for them: the one helper.

Every cache of the project (converted checkpoints here, exports in plugin/convert/cache.py) is built the
same way: under a file lock beside the target, in a hidden `.<name>.partial-*` folder next to it, and
moved into place as the last step, so a crash or an error leaves either nothing or a complete entry,
never a half-written one that looks finished. What "complete" means is the caller's: a marker file here,
a manifest whose hashes match for exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


class LockTimeout(TimeoutError):
    """Another process held a cache entry's lock for longer than the caller would wait."""


@contextmanager
def exclusive(target: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of cache entry `target` (`.<name>.lock` beside it) across processes.

    Waits for a process that is building the same entry (None: as long as it takes); LockTimeout names the
    lock file when `timeout` runs out.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building %s; waiting for it", target)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout as e:
            raise LockTimeout(str(target.parent / f".{target.name}.lock")) from e
    try:
        yield
    finally:
        lock.release()


def partial_dir(target: Path) -> Path:
    """A new hidden folder beside `target` to build it in (call while holding its lock)."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_partial_prefix(target)))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a cache entry is readable like any folder
    return tmp


def remove_partials(target: Path) -> None:
    """Under the lock no one else is building `target`: its partial folders are debris of a killed build."""
    for stale in target.parent.glob(_partial_prefix(target) + "*"):
        log.warning("removing an unfinished build left by an interrupted process: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Move a finished build into place; an old (invalid) entry is moved aside first, then removed."""
    if target.exists():
        trash = target.with_name(f"{_partial_prefix(target)}trash-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, target)


def copy_atomically(src: Path, dest: Path) -> None:
    """Copy a finished entry to a user's folder: into a partial sibling, then renamed over `dest`. A copy that
    fails (a full disk) removes its partial sibling and leaves `dest` as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{_partial_prefix(dest)}{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, dest)


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def is_complete(folder: Path) -> bool:
    """True when `folder` was finished by `build_once` (its marker exists)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text())


def _remove_leftovers(target: Path) -> None:
    """Under the lock no one else is building `target`: partial folders and an unmarked target are debris."""
    remove_partials(target)
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
    with exclusive(target):
        if is_complete(target):  # another process finished while we waited
            return target
        _remove_leftovers(target)
        tmp = partial_dir(target)
        start = time.perf_counter()
        try:
            facts = build(tmp)
            seconds = round(time.perf_counter() - start, 2)
            marker = {"what": what, "seconds": seconds, "created": time.time(), **(facts or {})}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, default=str))
            publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built %s in %.1f s: %s", what, seconds, target)
        return target
