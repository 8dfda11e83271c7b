"""least-outstanding: the healthy worker with the fewest requests in flight (LiteLLM's least-busy).

Ties go to the first tied worker after the last one chosen, so that equal
workers share the load in turn and the choice repeats run to run.
"""
from __future__ import annotations

from rsd_runtime.routing.base import Policy, RouteRequest, WorkerState


class LeastOutstanding(Policy):
    name = "least-outstanding"

    def __init__(self):
        self._last = -1

    def choose(self, req: RouteRequest, workers: list[WorkerState]) -> int:
        ok = self.healthy(workers)
        n = len(workers)
        best = min(workers[i].outstanding for i in ok)
        for k in range(1, n + 1):
            i = (self._last + k) % n
            if i in ok and workers[i].outstanding == best:
                self._last = i
                return i
        raise AssertionError("unreachable")
