"""Give back the weight-file pages onnxruntime keeps mapped after loading but no longer reads.

onnxruntime memory-maps every external initializer of `model.onnx.data` (private, read-write mappings),
reads them while pre-packing, and keeps some mapped for the session's life: on the fused int4 export the
MatMulNBits scales and zero points (their packed copies are what the int8-compute kernels read) and the
embedding table, ~19 MB of file pages on the default model that stay in the resident set although a
decode step touches only the embedding rows of its tokens. `release_weight_pages` drops those pages from
the process's page tables (madvise MADV_DONTNEED) right after load. It only touches mappings of the given
files that hold no private copy of a page (smaps "Anonymous": a page written through a private mapping), so
every page it drops is the file's own page-cache page and comes back on its next read: values cannot
change, only residency.
Measured in docs/fused-export.md ("Resident memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
SMAPS = Path("/proc/self/smaps")


@dataclass(frozen=True)
class Released:
    """What `release_weight_pages` did: mappings given back, their resident MB before, mappings kept (written)."""

    mappings: int = 0
    resident_mb: float = 0.0
    kept_dirty: int = 0


@dataclass
class _Mapping:
    start: int
    end: int
    path: str
    rss_kb: int = 0
    written_kb: int = 0  # private copies of pages written through the mapping


def _mappings(paths: set[str]) -> list[_Mapping]:
    out: list[_Mapping] = []
    current: _Mapping | None = None
    with SMAPS.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line
                path = parts[5] if len(parts) >= 6 else ""
                current = None
                if path in paths:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    current = _Mapping(start, end, path)
                    out.append(current)
            elif current is not None and parts[0] == "Rss:":
                current.rss_kb = int(parts[1])
            elif current is not None and parts[0] == "Anonymous:":
                current.written_kb = int(parts[1])
    return out


def release_weight_pages(files: list[Path]) -> Released:
    """Drop this process's clean resident pages of `files` (see the module docstring); Linux only, else a no-op."""
    if not sys.platform.startswith("linux") or not SMAPS.is_file():
        return Released()
    paths = {str(Path(f).resolve()) for f in files} | {str(Path(f).absolute()) for f in files}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released, resident_kb, dirty = 0, 0, 0
    for m in _mappings(paths):
        if m.written_kb:
            dirty += 1  # a page written through the mapping: dropping it would revert it to the file's bytes
            continue
        if libc.madvise(m.start, m.end - m.start, MADV_DONTNEED) != 0:
            log.debug("madvise failed on %s (errno %d)", m.path, ctypes.get_errno())
            continue
        released += 1
        resident_kb += m.rss_kb
    result = Released(released, round(resident_kb / 1024, 1), dirty)
    log.info("weight pages given back after load: %s", result)
    return result
