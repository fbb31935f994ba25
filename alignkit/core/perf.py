"""Throughput and memory measurements every stage reports."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field


def peak_memory_gib() -> float:
    """Peak accelerator memory (CUDA: max allocated since the last reset) or else the process's peak RSS.

    On CPU the peak RSS is a lifetime high-water mark of the whole process (the OS cannot reset it), so a
    later stage in the same process reports at least the earlier stages' peak.
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@dataclass
class Throughput:
    """Counts items (tokens, completions) over wall time: ``with meter: ...; meter.add(n)``."""

    count: float = 0.0
    seconds: float = 0.0
    _started: float | None = field(default=None, repr=False)

    def __enter__(self) -> "Throughput":
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - (self._started or time.perf_counter())
        self._started = None

    def add(self, n: float) -> None:
        self.count += n

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0
