"""What an HTTP response may say about this machine: a file's name, never where it lives."""

from __future__ import annotations

import re

# Absolute paths (POSIX, Windows, home-relative), except the API's own routes (/v1/..., /api/...).
_LOCAL_PATH = re.compile(r"(?<![\w.:/])(?:~|[A-Za-z]:)?[/\\](?!v1/|api/)(?:[\w.@+-]+[/\\])+([\w.@+-]*)")


def redact_paths(message: str) -> str:
    """Keep a file's name (it tells the user what failed) but not the server's directories."""
    return _LOCAL_PATH.sub(lambda m: f"<...>/{m.group(1)}", message)
