"""Where accelserve keeps what it builds (converted checkpoints, exports, kernels): one folder, overridable for tests.

It lives with the backends, the lowest layer, because they build into it too (the rows kernel); `plugin.home`
re-exports it for the rest of the package."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "ACCELSERVE_HOME"


def accelserve_home() -> Path:
    """`$ACCELSERVE_HOME`, else `~/.cache/accelserve`; created on first use so callers can write into it."""
    raw = os.environ.get(HOME_ENV)
    home = Path(raw).expanduser() if raw else Path.home() / ".cache" / "accelserve"
    home.mkdir(parents=True, exist_ok=True)
    return home
