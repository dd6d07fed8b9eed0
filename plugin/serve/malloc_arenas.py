"""Cap glibc's malloc arenas in a serving process.

glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and each arena
keeps freed memory for reuse. A serving process runs the engine loop, a runner, tokenizer and HTTP
threads: on the default int4 model that is ~33 MiB more peak RSS than the same work with two arenas
(`benchmarks/rss_serving.py`, docs/fused-export.md). onnxruntime allocates tensors from its own arena,
so the cap costs no measurable speed. `serve`, `chat` and `generate` call this before starting anything
(training and export keep glibc's default, where torch threads allocate in parallel); a user's
MALLOC_ARENA_MAX always wins, and a libc without mallopt (musl, macOS) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter
SERVING_ARENAS = 2


def cap_malloc_arenas(arenas: int = SERVING_ARENAS) -> bool:
    """Limit glibc to `arenas` malloc arenas for threads started from now on; True when applied."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # not glibc
        return False
    applied = libc.mallopt(M_ARENA_MAX, arenas) == 1
    log.debug("malloc arenas capped at %d: %s", arenas, applied)
    return applied
