"""Count what one decode step of the torch batching loop costs outside the model: host syncs, uploads, ops.

On a GPU every device-to-host read (`.item()`, `.tolist()`, `int(t)`, `.cpu()`, a tensor in an `if`) waits
for all queued kernels, and every `torch.tensor(list)` is a host-blocking copy up. The CPU has no such
stalls, so this audit counts the calls themselves: the same code makes the same calls on CUDA.
`ops` are the aten operators dispatched outside the model's forward (sampling, masks, bookkeeping), views
left out: each is at least one kernel launch on a GPU.

The runner is driven on the calling thread (its `_admit` and `_step`, never `start`), so the counters see
exactly one step at a time. Works with any version of backends.torch.batching that has BatchRunner,
make_work, `_admit` and `_step` (the benchmark audits the code before and after a change the same way).
"""

from __future__ import annotations

import statistics
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_METHODS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")
"""Reads that wait for the device (`.numpy()` is not one: it only works on a tensor already on the host)."""


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view:  # views launch no kernel
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_calls(thread_id: int | None = None, inside: Any = None) -> Iterator[Counter[str]]:
    """Count device-to-host reads (SYNC_METHODS) and `torch.tensor` uploads made on one thread while open.
    While `inside.paused` is true (the model's forward is running) they count under "model:<name>"."""
    counts: Counter[str] = Counter()
    me = threading.get_ident() if thread_id is None else thread_id
    saved: dict[str, Any] = {}

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == me:
                counts[f"model:{name}" if inside is not None and inside.paused else name] += 1
            return fn(*args, **kwargs)

        return counted

    for name in SYNC_METHODS:
        saved[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, wrap(name, saved[name]))
    saved_tensor = torch.tensor
    torch.tensor = wrap("torch.tensor", saved_tensor)
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.tensor = saved_tensor


def syncs(counts: Counter[str]) -> int:
    return sum(n for name, n in counts.items() if name in SYNC_METHODS)


def audit_steps(runner: Any, steps: int) -> dict[str, float]:
    """Run `steps` decode steps of a runner whose rows are already admitted; medians per step of host syncs,
    uploads and aten ops outside the model's forward (and, apart, the host syncs transformers makes inside
    it: with a padding mask its SDPA mask code reads `padding_mask.all()` once a step)."""
    model = runner.model
    inner = model.forward
    counter = _OpCounter()

    def forward(*args: Any, **kwargs: Any) -> Any:
        counter.paused += 1
        try:
            return inner(*args, **kwargs)
        finally:
            counter.paused -= 1

    per_step: list[tuple[int, int, int, int]] = []
    own = model.__dict__.get("forward")  # a test may already have wrapped it
    model.forward = forward
    try:
        with torch.inference_mode():
            for _ in range(steps):
                if not runner.rows:
                    break
                with count_host_calls(inside=counter) as calls, counter:
                    counter.ops.clear()
                    runner._step()
                in_model = sum(n for name, n in calls.items() if name.removeprefix("model:") in SYNC_METHODS) - syncs(
                    calls
                )
                per_step.append((syncs(calls), calls["torch.tensor"], sum(counter.ops.values()), in_model))
    finally:
        if own is None:
            del model.forward  # back to the class's forward
        else:
            model.forward = own
    if not per_step:
        nan = float("nan")
        return {"steps": 0, "host_syncs": nan, "uploads": nan, "ops": nan, "host_syncs_in_model": nan}
    return {
        "steps": len(per_step),
        "host_syncs": statistics.median(s[0] for s in per_step),
        "uploads": statistics.median(s[1] for s in per_step),
        "ops": statistics.median(s[2] for s in per_step),
        "host_syncs_in_model": statistics.median(s[3] for s in per_step),
    }


def admitted_runner(batching: Any, model: Any, device: torch.device, works: list[Any]) -> Any:
    """A BatchRunner (not started) with `works` prefilled and joined, ready for `_step`."""
    runner = batching.BatchRunner(model, device, max_batch_size=max(len(works), 1))
    for w in works:
        runner.submit(w)
    with torch.inference_mode():
        runner._admit()
        while getattr(runner, "_waiting", None):  # versions that prefill in groups, one group per step
            runner._admit()
    return runner
