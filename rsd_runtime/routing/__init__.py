"""Routing policies: which instance of a rack serves a request.

A policy is a plain object: it sees the router's view of its workers (healthy or
not, requests in flight) and the request (its prompt, its session key), and
returns a worker's index. It holds no sockets and reads no clock, so the live
router (``rsd_runtime.router``) and the replay on the emulated clock
(``rsd_runtime.replay``) run the very same code, and tests drive it alone.

    policy = get_policy("prefix-affinity")
    i = policy.choose(RouteRequest(tokens=[...]), workers)
    policy.on_dispatch(req, workers[i]) ... policy.on_finish(req, workers[i])
"""
from __future__ import annotations

from rsd_runtime.routing.base import NoWorker, Policy, RouteRequest, WorkerState
from rsd_runtime.routing.least_outstanding import LeastOutstanding
from rsd_runtime.routing.prefix_affinity import PrefixAffinity
from rsd_runtime.routing.round_robin import RoundRobin
from rsd_runtime.routing.session import Session

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (RoundRobin, LeastOutstanding, PrefixAffinity, Session)}


def get_policy(name: str, **options) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}") from None
    return cls(**options)


__all__ = ["POLICIES", "get_policy", "Policy", "RouteRequest", "WorkerState", "NoWorker"]
