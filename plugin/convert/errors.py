"""The one exception type export raises: its message is written for the user (what failed, how to fix it)."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export could not be produced, loaded from the cache, or verified."""
