"""The `auto` algorithm rule: pick by alpha-beta cost over the group's topology.

With alpha the largest one-way latency between neighbours of the group,
beta the smallest bottleneck bandwidth, n the group size and S the message
size in bytes (the whole buffer; for all_gather and reduce_scatter the whole
gathered / scattered buffer), the rule estimates, in emulated time:

| collective     | ring                      | tree                          | one-shot            |
| all_reduce     | 2(n-1)(alpha + S/(n beta))| 2 ceil(log2 n)(alpha + S/beta)| alpha + (n-1) S/beta|
| all_gather     | (n-1)(alpha + S/(n beta)) | 2 ceil(log2 n) alpha + 2S/beta| alpha + (n-1)S/(n beta)|
| reduce_scatter | (n-1)(alpha + S/(n beta)) | ceil(log2 n)(alpha + S/beta) + alpha + S/beta | alpha + (n-1)S/(n beta)|
| broadcast      | (n-1) alpha + S/beta (pipelined chain) | ceil(log2 n)(alpha + S/beta) | alpha + (n-1) S/beta|
| reduce         | (n-1) alpha + S/beta (pipelined chain) | ceil(log2 n)(alpha + S/beta) | alpha + (n-1) S/beta|

and takes the cheapest, ties going to ring, then tree. Where the topology
offers rings better than the default for all_reduce, all_gather and
reduce_scatter (``ring_search.search`` finds a set of
channels with a lower cost), ``ring:search`` competes too, priced by the ring
formulas with S/beta replaced by S times the searched rings' cost per byte
(their slowest card's, max-min shares over every channel's edges included);
it wins only when strictly cheaper. Every rank computes the same choice from
the same inputs, so the group always agrees.
"""
from __future__ import annotations

import math
from functools import lru_cache

from interconnect import ring_search
from interconnect.ring import DEFAULT
from interconnect.topology import Topology

ALGOS = ("ring", "tree", "one-shot")


def _costs(op: str, n: int, size: int, alpha: float, beta: float) -> dict[str, float]:
    lg = math.ceil(math.log2(n))
    s = size / beta
    return {
        "all_reduce": {"ring": 2 * (n - 1) * (alpha + s / n), "tree": 2 * lg * (alpha + s),
                       "one-shot": alpha + (n - 1) * s},
        "all_gather": {"ring": (n - 1) * (alpha + s / n), "tree": 2 * lg * alpha + 2 * s,
                       "one-shot": alpha + (n - 1) * s / n},
        "reduce_scatter": {"ring": (n - 1) * (alpha + s / n), "tree": lg * (alpha + s) + alpha + s,
                           "one-shot": alpha + (n - 1) * s / n},
        "broadcast": {"ring": (n - 1) * alpha + s, "tree": lg * (alpha + s), "one-shot": alpha + (n - 1) * s},
        "reduce": {"ring": (n - 1) * alpha + s, "tree": lg * (alpha + s), "one-shot": alpha + (n - 1) * s},
    }[op]


def choose(op: str, nbytes: int, cards: list[int], topology: Topology) -> str:
    return _choose(op, nbytes, tuple(cards), topology)


def resolve(algo: str, op: str, nbytes: int, cards: list[int], topology: Topology) -> str:
    """``algo`` itself, or for ``"auto"`` the algorithm the rule picks (``nbytes``: the whole buffer)."""
    return choose(op, nbytes, cards, topology) if algo == "auto" else algo


@lru_cache(maxsize=1 << 14)
def _choose(op: str, nbytes: int, cards: tuple, topology: Topology) -> str:
    n = len(cards)
    if n <= 2:
        return "one-shot" if op in ("all_reduce", "all_gather", "reduce_scatter") else "ring"
    pairs = [(cards[i], cards[(i + 1) % n]) for i in range(n)]
    alpha = max(topology.latency_ns(a, b) for a, b in pairs)  # ns
    beta = min(topology.bottleneck_gbps(a, b) for a, b in pairs)  # GB/s = bytes/ns
    costs = _costs(op, n, nbytes, alpha, beta)
    best = min(ALGOS, key=lambda a: (costs[a], ALGOS.index(a)))
    rings = ring_search.search(topology, cards) if op in ("all_reduce", "all_gather", "reduce_scatter") else DEFAULT
    if rings != DEFAULT:
        searched = _costs(op, n, nbytes, alpha, 1 / ring_search.cost(topology, cards, rings))["ring"]
        if searched < costs[best]:
            return "ring:search"
    return best
