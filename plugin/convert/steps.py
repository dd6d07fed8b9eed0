"""Timed steps with a progress display: each export step shows a spinner and records its duration."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class StepTimer:
    """Collects (step, seconds) pairs; shows a rich spinner per step when `progress` is on."""

    progress: bool = True
    label: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str, description: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("%s%s ...", self.label, description)
        if self.progress:
            from rich.console import Console

            console = Console(stderr=True)
            with console.status(f"[bold]{self.label}{description}[/]"):
                yield
            elapsed = time.perf_counter() - start
            console.print(f"[green]✓[/] {self.label}{description} [dim]{elapsed:.1f}s[/]")
        else:
            yield
            elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        log.info("%s%s done in %.2fs", self.label, description, elapsed)
