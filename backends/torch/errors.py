"""Which failures end one request and which end the runner: the one classification the batching loop uses.

- Out of memory is a request-level failure: the loop rolls the shared cache back, fails the request it
  was serving (or the newest row), frees the allocator's cache and carries on.
- An unrecoverable CUDA error leaves the CUDA context unusable for the rest of the process (a device-side
  assert, an illegal memory access, a kernel image the torch build lacks for this GPU, a launch failure,
  an ECC error): every later kernel fails too. The runner stops, ends every stream, and reports
  "restart required" so that the engine stops routing to it. Retrying on the same context only spreads
  the failure (vLLM and PyTorch's own docs give the same advice: restart the process).
- Anything else raised while serving one row (bad input, a model bug) fails the rows it concerns.
"""

from __future__ import annotations

import torch

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
if hasattr(torch, "OutOfMemoryError"):
    OOM_ERRORS = (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError)

_FATAL_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "no kernel image",
    "unspecified launch failure",
    "misaligned address",
    "uncorrectable ecc",
    "cudaerrorlaunchfailure",
    "cuda error: launch failure",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cuda driver error",
    "device not ready",
    "gpu has fallen off the bus",
)
"""Messages of CUDA errors after which the context is corrupted (torch raises them as RuntimeError or,
since 2.8, torch.AcceleratorError)."""


class RestartRequired(RuntimeError):
    """The device's context is unusable; only a new process can use this GPU again."""


def is_oom(error: BaseException) -> bool:
    """Out of memory, from the caching allocator (OutOfMemoryError) or a library ("CUDA error: out of memory")."""
    if isinstance(error, OOM_ERRORS):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def is_fatal(error: BaseException) -> bool:
    """Whether `error` leaves the device's context unusable (see _FATAL_MARKERS)."""
    if isinstance(error, RestartRequired):
        return True
    if not isinstance(error, RuntimeError) or is_oom(error):
        return False
    text = str(error).lower()
    return any(marker in text for marker in _FATAL_MARKERS)


def describe(error: BaseException) -> str:
    """One line for a log or an error chunk: the type and the first line of the message."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
