"""session: requests with the same session key (x-session-id header or `user`) go to one worker.

The worker is chosen by rendezvous (highest random weight) hashing of the key
over the healthy workers: a key keeps its worker as long as that worker is
healthy, and only the keys of a worker that fails move. Requests without a key
go round-robin.
"""
from __future__ import annotations

import hashlib

from rsd_runtime.routing.base import Policy, RouteRequest, WorkerState
from rsd_runtime.routing.round_robin import RoundRobin


def _weight(key: str, worker: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{worker}".encode(), digest_size=8).digest(), "big")


class Session(Policy):
    name = "session"

    def __init__(self):
        self._fallback = RoundRobin()

    def choose(self, req: RouteRequest, workers: list[WorkerState]) -> int:
        if not req.session:
            return self._fallback.choose(req, workers)
        ok = self.healthy(workers)
        return max(ok, key=lambda i: (_weight(req.session, workers[i].name), -i))
