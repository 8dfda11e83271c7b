"""round-robin: each request to the next healthy worker in turn."""
from __future__ import annotations

from rsd_runtime.routing.base import Policy, RouteRequest, WorkerState


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def choose(self, req: RouteRequest, workers: list[WorkerState]) -> int:
        ok = self.healthy(workers)
        n = len(workers)
        for k in range(n):
            i = (self._next + k) % n
            if i in ok:
                self._next = i + 1
                return i
        raise AssertionError("unreachable: healthy() found one")
