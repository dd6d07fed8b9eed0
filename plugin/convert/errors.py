"""The one exception type export raises: its message is written for the user (what failed, how to fix it)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ExportError(RuntimeError):
    """An export could not be produced, loaded from the cache, or verified."""


@contextmanager
def disk_full_is_clear(folder: Path) -> Iterator[None]:
    """A full disk while writing an export becomes an ExportError saying where and what to do (the callers
    have already removed their partial folder, so nothing half-written is left or published)."""
    try:
        yield
    except OSError as e:
        if not _is_disk_full(e):
            raise
        try:
            free = f"{shutil.disk_usage(folder).free / 2**30:.1f} GiB free"
        except OSError:
            free = "free space unknown"
        raise ExportError(
            f"the disk holding {folder} is full ({free}) while writing the export; nothing was published. Free "
            "some space, or set ACCELSERVE_HOME (the cache) or --output to a folder on a larger disk, and retry."
        ) from e


def _is_disk_full(e: OSError) -> bool:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, shutil.Error):  # copytree reports each file's error as text, without its errno
        reasons = [str(item[-1]) for item in e.args[0]] if e.args and isinstance(e.args[0], list) else [str(e)]
        full = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
        return any(text in reason for reason in reasons for text in full)
    return False
