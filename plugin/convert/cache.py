"""The export cache: `<home>/exports/<key>/`, on the project's one build-once helper (plugin/cache.py).

Lock, partial folder, atomic publish and copy are plugin/cache.py's. What is export-specific lives here:
the key, source hashing, and what "finished" means: a `manifest.json` whose file hashes and sizes match
the files beside it. A killed export leaves only a `.<key>.partial-*` folder, which the next export of
the same key removes while holding the key's lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plugin import cache as shared
from plugin.cache import sha256_file
from plugin.convert.errors import ExportError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
HASH_MEMO = ".source-hashes.json"
LOCK_TIMEOUT_S = 3600.0  # a real export of a small model takes minutes; waiting beats duplicate work


def _load_memo(memo: Path | None) -> dict[str, str]:
    if memo is None or not memo.is_file():
        return {}
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.info("ignoring unreadable hash memo %s: %s", memo, e)
        return {}
    return data if isinstance(data, dict) else {}


def hash_source(folder: Path, memo: Path | None = None) -> str:
    """Content hash of a checkpoint folder: names and bytes of every file (sorted), hidden files excluded.

    Per-file digests are memoised in `memo` by (path, size, mtime), so a cache hit on a large checkpoint
    does not re-read its weights; any edit changes the mtime and so the digest is recomputed.
    """
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    if not files:
        raise ExportError(f"{folder} holds no files; point at a Hugging Face model folder (config.json + weights)")
    known = _load_memo(memo)
    fresh: dict[str, str] = {}
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        memo_key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = known.get(memo_key) or sha256_file(p)
        fresh[memo_key] = digest
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(b"\0")
        h.update(digest.encode())
    if memo is not None and any(k not in known for k in fresh):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({**known, **fresh}), encoding="utf-8")
        os.replace(tmp, memo)
    return h.hexdigest()


def compute_key(
    name: str, target: str, precision: str, source_hash: str, options: dict[str, Any], versions: dict[str, str]
) -> str:
    """Folder name: readable prefix plus a hash of everything that changes the produced files."""
    payload = json.dumps(
        {"source": source_hash, "target": target, "precision": precision, "options": options, "versions": versions},
        sort_keys=True,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:48].strip("-.") or "model"
    return f"{safe}-{target}-{precision}-{digest}"


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the folder except the manifest."""
    return {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("unreadable manifest %s: %s", path, e)
        return None


def verify_folder(folder: Path, key: str | None = None) -> list[str]:
    """Problems that make `folder` not a finished export (empty list = valid)."""
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder / MANIFEST} is missing or unreadable"]
    problems = []
    if key is not None and manifest.get("key") != key:
        problems.append(f"manifest key {manifest.get('key')!r} is not the expected {key!r}")
    files = manifest.get("files") or {}
    if not files:
        problems.append("manifest lists no files")
    for name, rec in files.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{name} is missing")
            continue
        size = p.stat().st_size
        if size != rec.get("size"):
            problems.append(f"{name} is {size} bytes, manifest says {rec.get('size')}")
        elif sha256_file(p) != rec.get("sha256"):
            problems.append(f"{name} content differs from its manifest hash")
    return problems


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomic manifest write (temp file + rename), so readers never see half a manifest."""
    tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


@contextmanager
def key_lock(root: Path, key: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock for one key across processes (another process exporting it makes us wait)."""
    try:
        with shared.exclusive(root / key, timeout=timeout):
            yield
    except shared.LockTimeout as e:
        raise ExportError(
            f"another process has held the export lock {e} for {timeout:.0f}s; "
            "wait for it, or delete the lock file if no export is running"
        ) from e


def new_tmp_dir(root: Path, key: str) -> Path:
    """Where to build `key` (call while holding its lock)."""
    return shared.partial_dir(root / key)


def clean_stale_tmp(root: Path, key: str) -> None:
    """Remove partial folders of `key` left by killed exports (call while holding the key's lock)."""
    shared.remove_partials(root / key)


publish = shared.publish
copy_to_output = shared.copy_atomically
