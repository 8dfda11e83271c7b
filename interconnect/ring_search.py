"""Ring orders for a group: given (``NCCL_RINGS``-style), default, or searched for the topology.

An algorithm name ``ring:SPEC`` picks the rings of the ring algorithms:

* ``ring:default`` (or plain ``ring``): one channel in group-rank order;
* ``ring:search``: the rings this module finds for the group's cards;
* ``ring:0 1 2 3|3 2 1 0``: one channel per ``|``-separated order of group ranks.

The search works as NCCL's graph search does, on the cost it states: with C
channels and every channel's ring edges running at once, each edge gets its
max-min fair rate over the topology (``Topology.flow_bandwidth``), and a card's
port sends (and receives) its channels' pieces one after another, so a ring
step costs a card sum(1 / rate) over its out-going (in-coming) edges, over C.
The cost of a ring set is that of its slowest card; the search returns the
cheapest candidate, the default ring winning ties. Candidates: the cards in
the order of a walk down the PCIe tree (cards under one switch together), and,
where cards form islands joined by a direct fabric (the boxes of the study
presets), 1 to ``MAX_CHANNELS`` channels that go through the islands one after
the other, each channel leaving and entering every island by cards that no
earlier channel used, picked greedily by the same cost over the crossings.
"""
from __future__ import annotations

from functools import lru_cache, partial

import networkx as nx

from interconnect import ring
from interconnect.ring import DEFAULT, RingSet
from interconnect.topo_graph import FABRIC
from interconnect.topology import Topology

MAX_CHANNELS = 4
PREFIX = "ring:"


def parse(spec: str, n: int | None = None) -> RingSet | str:
    """The RingSet of ``default`` or an explicit order list; ``"search"`` is returned as is."""
    spec = spec.strip()
    if spec in ("", "default"):
        return DEFAULT
    if spec == "search":
        return spec
    orders = []
    for part in spec.split("|"):
        try:
            orders.append(tuple(int(x) for x in part.split()))
        except ValueError:
            raise ValueError(f"ring order {part.strip()!r}: expected group ranks separated by spaces "
                             f"(or 'default', 'search')") from None
    rings = RingSet(tuple(orders))
    if n is not None:
        rings.channels(n)
    return rings


def check_name(algo: str) -> None:
    """Raise ValueError naming the problem if ``algo`` is a malformed ``ring:`` name."""
    if algo.startswith(PREFIX):
        parse(algo[len(PREFIX):])


def algorithm(algo: str, cards: list[int], topology: Topology):
    """The ring module's functions bound to the rings ``algo`` names for a group of ``cards``."""
    rings = parse(algo[len(PREFIX):], len(cards))
    if rings == "search":
        rings = search(topology, tuple(cards))
    return _Bound(rings)


class _Bound:
    def __init__(self, rings: RingSet):
        for name in ("all_reduce", "all_gather", "reduce_scatter"):
            setattr(self, name, partial(getattr(ring, name), rings=rings))
        self.broadcast, self.reduce = ring.broadcast, ring.reduce  # one chain (see interconnect.ring)


def cost(topology: Topology, cards: tuple[int, ...], rings: RingSet) -> float:
    """ns per byte of a ring step's data, on the slowest card (see the module docstring)."""
    orders = rings.channels(len(cards))
    flows = [(cards[a], cards[b]) for order in orders for a, b in zip(order, order[1:] + order[:1])]
    return _card_cost(topology, flows) / len(orders)


def _card_cost(topology: Topology, flows: list[tuple[int, int]]) -> float:
    rate = topology.flow_bandwidth(flows)  # GB/s = bytes/ns
    out: dict[int, float] = {}
    inn: dict[int, float] = {}
    for s, d in flows:
        out[s] = out.get(s, 0.0) + 1 / rate[s, d]
        inn[d] = inn.get(d, 0.0) + 1 / rate[s, d]
    return max(*out.values(), *inn.values())


@lru_cache(maxsize=256)
def search(topology: Topology, cards: tuple[int, ...]) -> RingSet:
    """The cheapest ring set found for ``cards`` (group ranks in the orders); DEFAULT on ties."""
    n = len(cards)
    if n <= 2:
        return DEFAULT
    walk = _tree_walk(topology, cards)
    islands = _islands(topology, cards, walk)
    candidates = [DEFAULT, RingSet((tuple(walk),))]
    if len(islands) > 1 and max(map(len, islands)) > 1:
        most = min(MAX_CHANNELS, min(max(1, len(i) // 2) for i in islands))
        candidates += [_through_islands(topology, cards, islands, c) for c in range(1, most + 1)]
    costs = [cost(topology, cards, r) for r in candidates]
    best = min(range(len(candidates)), key=lambda i: (costs[i], i))
    return candidates[best] if costs[best] < costs[0] * (1 - 1e-9) else DEFAULT


def _tree_walk(topology: Topology, cards: tuple[int, ...]) -> list[int]:
    """Group ranks in the order a depth-first walk of the PCIe tree from its centre meets them."""
    tree = topology._tree
    root = min(nx.center(tree))
    place = {node: i for i, node in enumerate(nx.dfs_preorder_nodes(tree, root, sort_neighbors=sorted))}
    return sorted(range(len(cards)), key=lambda r: (place[topology.cards[cards[r]]], r))


def _islands(topology: Topology, cards: tuple[int, ...], walk: list[int]) -> list[list[int]]:
    """Group ranks joined by direct fabric links, islands and their ranks in walk order."""
    g = nx.Graph()
    g.add_nodes_from(range(len(cards)))
    names = [topology.cards[c] for c in cards]
    for i in range(len(cards)):
        for j in range(i + 1, len(cards)):
            edge = topology.graph.get_edge_data(names[i], names[j])
            if edge is not None and edge["kind"] == FABRIC:
                g.add_edge(i, j)
    order = {r: k for k, r in enumerate(walk)}
    islands = [sorted(c, key=order.get) for c in nx.connected_components(g)]
    return sorted(islands, key=lambda i: order[i[0]])


def _through_islands(topology: Topology, cards: tuple[int, ...], islands: list[list[int]], num: int) -> RingSet:
    """``num`` channels, each through the islands in turn, crossing between them where the
    crossings chosen so far leave the most bandwidth; no card leaves (enters) an island twice."""
    m = len(islands)
    exits, entries = set(), set()
    crossings: list[tuple[int, int]] = []
    orders = []
    for _ in range(num):
        entry: dict[int, int] = {}
        exit_: dict[int, int] = {}
        for i in range(m):
            src, dst = islands[i], islands[(i + 1) % m]
            best = None
            for x in src:
                if x in exits and len(exits & set(src)) < len(src) or (len(src) > 1 and entry.get(i) == x):
                    continue
                for y in dst:
                    if y in entries and len(entries & set(dst)) < len(dst):
                        continue
                    if len(dst) > 1 and exit_.get((i + 1) % m) == y:
                        continue
                    trial = [*crossings, (cards[x], cards[y])]
                    score = (_card_cost(topology, trial), x, y)
                    if best is None or score < best:
                        best = score
            _, x, y = best
            exit_[i], entry[(i + 1) % m] = x, y
            exits.add(x)
            entries.add(y)
            crossings.append((cards[x], cards[y]))
        order = []
        for i, island in enumerate(islands):
            first, last = entry[i], exit_[i]
            middle = [r for r in island if r not in (first, last)]
            order += [first, *middle, last] if first != last else [first]
        orders.append(tuple(order))
    return RingSet(tuple(orders))
