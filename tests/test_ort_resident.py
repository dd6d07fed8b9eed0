"""release_weight_pages: clean mapped pages of a weight file go back and read the same; written pages stay."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

from backends.ort_genai.resident import _mappings, release_weight_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

PAGES = 64


def _weights(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytes(range(256)) * (PAGES * mmap.PAGESIZE // 256)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data)
    return path, data


def test_clean_pages_are_given_back_and_read_the_same(tmp_path):
    path, data = _weights(tmp_path)
    with path.open("rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and writable, as onnxruntime maps
    try:
        assert view[:] == data  # every page resident
        released = release_weight_pages([path])
        assert released.mappings == 1 and released.kept_dirty == 0
        assert released.resident_mb > 0
        assert [m.rss_kb for m in _mappings({str(path.resolve())})] == [0]  # no longer resident here
        assert view[:] == data  # read back from the file
    finally:
        view.close()


def test_written_pages_are_kept(tmp_path):
    path, data = _weights(tmp_path)
    with path.open("rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        view[0:4] = b"edit"  # a private copy of the first page: dropping it would lose the write
        released = release_weight_pages([path])
        assert released.mappings == 0 and released.kept_dirty == 1
        assert view[0:4] == b"edit" and view[4:] == data[4:]
    finally:
        view.close()


def test_files_not_mapped_are_ignored(tmp_path):
    assert release_weight_pages([tmp_path / "absent.data"]).mappings == 0
