"""One rendering of a placement for every surface: JSON (CLI, HTTP bodies), HTTP headers, a text line, markdown.

The labels are the honest ones: a device is real hardware, `emulated` (a vendor's NPU compiler and runtime
executing on the host CPU, e.g. QNN HTP on x86: proves compilation and numerics, not speed or power), or
`simulated` (a made-up device in the inventory, executing on the CPU provider, to exercise the scheduler).
"""

from __future__ import annotations

from typing import Any


def execution_label(placement: Any) -> str:
    """'' for real hardware, else what really executes."""
    if getattr(placement, "emulated", False):
        return "emulated on the CPU"
    if placement.simulated:
        return "simulated, runs on the CPU"
    return ""


def placement_dict(placement: Any, metrics: Any | None = None) -> dict[str, Any]:
    """Where a reply ran and why: the CLI's --json `placement` and the `accelserve` field of HTTP responses."""
    out: dict[str, Any] = {
        "device": placement.device,
        "device_id": placement.device_id,
        "backend": placement.backend,
        "provider": placement.provider,
        "precision": placement.precision,
        "simulated": placement.simulated,
        "emulated": bool(getattr(placement, "emulated", False)),
        "reason": placement.reason,
        "fallback_from": list(placement.fallback_from),
    }
    if metrics is not None:
        out["metrics"] = metrics.to_dict()
    return out


def placement_headers(placement: Any, request_id: str) -> dict[str, str]:
    return {
        "x-accelserve-device": placement.device,
        "x-accelserve-device-id": placement.device_id,
        "x-accelserve-backend": placement.backend,
        "x-accelserve-provider": placement.provider,
        "x-accelserve-simulated": "true" if placement.simulated else "false",
        "x-accelserve-emulated": "true" if getattr(placement, "emulated", False) else "false",
        "x-accelserve-request-id": request_id,
    }


def placement_text(placement: Any, metrics: Any | None = None, *, markdown: bool = False) -> str:
    """The line under every reply: device (and how it executes), backend, provider, precision, speed, reason."""
    label = execution_label(placement)
    device = placement.device.upper() + (f" ({label})" if label else "")
    provider = f"`{placement.provider}`" if markdown else placement.provider
    parts = [f"**{device}**" if markdown else device, placement.backend, provider, placement.precision]
    if metrics is not None:
        if metrics.ttft_s is not None:
            parts.append(f"TTFT {metrics.ttft_s * 1000:.0f} ms")
        if metrics.tokens_per_s is not None:
            parts.append(f"{metrics.tokens_per_s:.1f} tok/s")
        parts.append(f"{metrics.new_tokens} tokens")
    if markdown:
        return " · ".join(parts) + f"  \n*{placement.reason}*"
    return " · ".join(parts) + f" — {placement.reason}"
