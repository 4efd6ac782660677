"""Honest run metrics: exact optimizer-state bytes, peak memory, throughput."""

from __future__ import annotations

import os
import threading
from typing import Any

import torch


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (nested dicts / lists / tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in ``optimizer.state`` (moments, step counters, projector bases, ...)."""
    return tensor_bytes(list(optimizer.state.values()))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of the code inside ``with``.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, tensors only). CPU: peak resident-set size minus the RSS at
    entry, sampled every 5 ms by a thread (approximate: includes allocator caching and anything else the process
    allocates, and can miss spikes shorter than the sampling period).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, _rss_bytes())

    def read(self) -> int:
        """Peak bytes above the level at entry, so far."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        self._max = max(self._max, _rss_bytes())
        return self._max - self._base

    def __exit__(self, *exc) -> None:
        self.peak = self.read()
        if self.device.type != "cuda":
            self._stop.set()
            self._thread.join()

