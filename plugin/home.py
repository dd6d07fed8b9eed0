"""Where accelserve keeps what it builds: defined in `backends.home` (the backends build into it too)."""

from backends.home import HOME_ENV, accelserve_home

__all__ = ["HOME_ENV", "accelserve_home"]
