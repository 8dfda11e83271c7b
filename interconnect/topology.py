"""Topologies: the links a message from card src to card dst crosses, and what it costs.

A topology is a graph (see `interconnect.topo_graph`) of cards, PCIe
switches, root ports, CPU sockets, NICs and network switches; each edge is a
link spec. A route is the one direct fabric link between the two cards if
there is one (multi-hop fabric routes are never taken, as RCCL never picks a
2-hop XGMI path: ROCm/rccl#272), else the path through the PCIe tree: up to
the lowest switch common to both cards and down, across the root complex
between root ports, across the inter-socket link between sockets, across
NICs and network switches between hosts. A socket that does not forward
peer-to-peer cuts the route into store-and-forward stages at host memory.

A link instance is one direction of one port (`LinkId`), so that traffic in
opposite directions of a full-duplex link does not contend, while flows that
cross the same direction of the same port do. Flows that run at once share
every channel they cross by max-min fairness (`topo_maxmin`). A card's port
sends (receives) one message at a time, queueing the rest (see
interconnect.emulation), so on each channel the flows count as
min(distinct senders, distinct receivers) concurrent streams, spread evenly
over the flows: several flows from one sender are one stream. Instances that
share the fabric (``tenants``, see ``topo_tenants``) add the same step's flows
on their own cards. All times are integer nanoseconds; rates are exact fractions.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import networkx as nx

from interconnect import topo_presets, topo_tenants, topo_toml
from interconnect.links import LinkSpec, exact_gbps, get_link, serialise_ns
from interconnect.topo_graph import CPU, FABRIC, NET_SWITCH, NIC, ROOT_PORT, SOCKET, SWITCH, tree_view
from interconnect.topo_maxmin import max_min_rates

UP = "up"  # from an edge's lower node (card side) to its upper node
DOWN = "down"

Flow = tuple[int, int]

# Labels of the card-to-card matrix, after `nvidia-smi topo -m` (and rocm-smi's XGMI).
LEGEND = {
    "X": "self",
    "XGMI": "a direct card-to-card fabric link (Infinity Fabric / xGMI or NVLink class)",
    "PIX": "through at most one PCIe switch",
    "PXB": "through several PCIe switches, without reaching a root port",
    "PHB": "across the root complex (root ports, host bridge) of one CPU socket",
    "SYS": "across the root complexes of two sockets and the inter-socket link",
    "NET": "across NICs and a network",
}


@dataclass(slots=True, frozen=True)
class LinkId:
    port: str  # "card3", "leaf1", "node0-nic"
    direction: str  # UP or DOWN


@dataclass(slots=True, frozen=True)
class Hop:
    link: LinkId
    spec: LinkSpec

    @property
    def channel(self) -> LinkId:
        """What the flows on this hop share: one direction, or the whole port if half duplex."""
        return self.link if self.spec.duplex else LinkId(self.link.port, "both")


@dataclass(slots=True, frozen=True)
class Stage:
    """Hops crossed cut-through, and the host-memory latency paid at the stage's ends."""
    hops: tuple[Hop, ...]
    overhead_ns: int
    channels: tuple[int, ...]  # distinct channels, as the topology numbers them

    @property
    def latency_ns(self) -> int:
        return sum(h.spec.latency_ns for h in self.hops) + self.overhead_ns


class Topology:
    """Routes and costs over a checked topology graph (`GraphBuilder.build`).

    A message pays, per stage, the stage's hop latencies and host overheads,
    plus ceil(nbytes / its max-min rate on the stage).
    """

    def __init__(self, graph: nx.Graph, name: str, link: LinkSpec, tenants=()):
        self.graph = graph
        self.name = name
        self.link = link  # the cards' own link
        self.cards: list[str] = graph.graph["cards"]
        self.num_cards = len(self.cards)
        self.tenants = topo_tenants.check(tenants, self.num_cards)  # groups of cards stepped together
        self._tree = tree_view(graph)
        self._hops: dict[tuple[str, str], Hop] = {}
        self._channel_ids: dict[LinkId, int] = {}
        self._capacity: list[Fraction] = []  # GB/s, exact, per channel number
        self._stages = lru_cache(maxsize=None)(self._stages_uncached)
        self._paths_from = lru_cache(maxsize=None)(lambda card: nx.single_source_shortest_path(self._tree, card))
        self._rates = lru_cache(maxsize=256)(self._rates_uncached)

    def __repr__(self) -> str:
        tenants = f", tenants={[list(t) for t in self.tenants]}" if self.tenants else ""
        return f"Topology({self.name!r}, num_cards={self.num_cards}, link={self.link.name!r}{tenants})"

    def with_tenants(self, tenants) -> "Topology":
        """The same fabric shared by instances on these groups of cards, stepped together."""
        return Topology(self.graph, self.name, self.link, tenants)

    # -- routes ----------------------------------------------------------------
    def _check_card(self, card: int) -> None:
        if not isinstance(card, int) or isinstance(card, bool) or not 0 <= card < self.num_cards:
            raise ValueError(f"card {card!r} out of range for {self.num_cards} cards")

    def _check(self, src: int, dst: int) -> None:
        self._check_card(src)
        self._check_card(dst)
        if src == dst:
            raise ValueError(f"no path from card {src} to itself")

    def route(self, src: int, dst: int) -> list[str]:
        """The nodes a message from card src to card dst crosses, both cards included."""
        self._check(src, dst)
        a, b = self.cards[src], self.cards[dst]
        if self.graph.has_edge(a, b):
            return [a, b]
        return self._paths_from(a)[b]

    def _hop(self, a: str, b: str) -> Hop:
        hop = self._hops.get((a, b))
        if hop is None:
            e = self.graph.edges[a, b]
            hop = self._hops[a, b] = Hop(LinkId(e["port"], UP if a == e["lower"] else DOWN), e["spec"])
        return hop

    def _stages_uncached(self, src: int, dst: int) -> tuple[Stage, ...]:
        nodes = self.route(src, dst)
        cuts = [i for i in range(1, len(nodes) - 1) if self._stores(nodes[i])]
        bounds = [0, *cuts, len(nodes) - 1]
        stages = []
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            overhead = sum(self.graph.nodes[nodes[i]]["host_latency_ns"] for i in (lo, hi) if i in cuts)
            hops = tuple(self._hop(nodes[i], nodes[i + 1]) for i in range(lo, hi))
            stages.append(Stage(hops, overhead, tuple(dict.fromkeys(self._channel(h) for h in hops))))
        return tuple(stages)

    def _channel(self, hop: Hop) -> int:
        ch = hop.channel
        if ch not in self._channel_ids:
            self._channel_ids[ch] = len(self._capacity)
            self._capacity.append(exact_gbps(hop.spec.bandwidth_gbps))
        return self._channel_ids[ch]

    def _stores(self, node: str) -> bool:
        data = self.graph.nodes[node]
        return data["kind"] == CPU and not data["p2p"]

    def stages(self, src: int, dst: int) -> list[list[Hop]]:
        """The path cut where a message is stored whole (at host memory when a socket does not forward P2P)."""
        self._check(src, dst)
        return [list(s.hops) for s in self._stages(src, dst)]

    def path(self, src: int, dst: int) -> list[Hop]:
        return [hop for stage in self.stages(src, dst) for hop in stage]

    def relation(self, src: int, dst: int) -> str:
        """The card-to-card matrix label (see LEGEND)."""
        if src == dst:
            self._check_card(src)
            return "X"
        nodes = self.route(src, dst)
        kinds = [self.graph.nodes[n]["kind"] for n in nodes[1:-1]]
        if not kinds:
            return "XGMI"
        if NET_SWITCH in kinds or NIC in kinds:
            return "NET"
        if any(self.graph.edges[a, b]["kind"] == SOCKET for a, b in zip(nodes, nodes[1:])):
            return "SYS"
        if CPU in kinds or ROOT_PORT in kinds:
            return "PHB"
        return "PIX" if kinds.count(SWITCH) <= 1 else "PXB"

    @property
    def num_groups(self) -> int:
        """Groups of cards that hang from one node (a switch, a socket)."""
        return len({self._parent(c) for c in self.cards})

    def _parent(self, card: str) -> str | None:
        ups = [n for n in self.graph[card] if self.graph.edges[card, n]["kind"] != FABRIC]
        return ups[0] if ups else None

    # -- costs -----------------------------------------------------------------
    def latency_ns(self, src: int, dst: int) -> int:
        self._check(src, dst)
        return sum(s.latency_ns for s in self._stages(src, dst))

    def bottleneck_gbps(self, src: int, dst: int) -> float:
        return min(h.spec.bandwidth_gbps for h in self.path(src, dst))

    def _rates_uncached(self, flows: tuple[Flow, ...]) -> dict[tuple[Flow, int], Fraction]:
        """Max-min rate (GB/s) of every stage of every flow, the flows running at once."""
        paths: dict[tuple[Flow, int], tuple[int, ...]] = {}
        senders: dict[int, set[int]] = {}
        receivers: dict[int, set[int]] = {}
        users: dict[int, int] = {}
        for src, dst in flows:
            self._check(src, dst)
            for i, stage in enumerate(self._stages(src, dst)):
                paths[(src, dst), i] = stage.channels
                for c in stage.channels:
                    senders.setdefault(c, set()).add(src)
                    receivers.setdefault(c, set()).add(dst)
                    users[c] = users.get(c, 0) + 1
        capacity = {c: self._capacity[c] for c in users}
        # each flow on a channel is one of `users` time-sharing min(S, R) streams
        weight = {c: Fraction(min(len(senders[c]), len(receivers[c])), n) for c, n in users.items()}
        caps = {sf: min(capacity[c] for c in cs) for sf, cs in paths.items()}  # alone on its slowest hop
        return max_min_rates(paths, capacity, weight, caps)

    def _flow_rates(self, flows: Iterable[Flow]) -> dict[tuple[Flow, int], Fraction]:
        own = tuple(dict.fromkeys((s, d) for s, d in flows))
        return self._rates(tuple(dict.fromkeys(topo_tenants.concurrent(self.tenants, own))))

    def flow_bandwidth(self, flows: list[Flow]) -> dict[Flow, float]:
        """GB/s each flow gets while all `flows` run at once (max-min fair over every channel),
        beside the same flows on the other tenants.

        A pair listed twice counts once: its messages share both card ports.
        This is the slowest stage's rate, not end-to-end goodput: for a
        store-and-forward topology use transfer_time_ns.
        """
        rates = self._flow_rates(flows)
        best: dict[Flow, Fraction] = {}
        for (flow, _), r in rates.items():
            best[flow] = min(r, best.get(flow, r))
        return {(s, d): float(best[(s, d)]) for s, d in flows}

    def transfer_time_ns(
        self, src: int, dst: int, nbytes: int, concurrent_flows: Iterable[Flow] | None = None
    ) -> int:
        """Latency + ceil(nbytes / max-min rate), summed over stages, in integer ns.

        `concurrent_flows` is the set of flows running at the same time;
        (src, dst) is counted once whether or not it is listed.
        """
        self._check(src, dst)
        rates = self._flow_rates([*(concurrent_flows or ()), (src, dst)])
        return sum(stage.latency_ns + serialise_ns(nbytes, rates[(src, dst), i])
                   for i, stage in enumerate(self._stages(src, dst)))


def get_topology(name: str, num_cards: int | None, link: str | LinkSpec | None = None, *, tenants=(),
                 **options) -> Topology:
    """A preset by name (see `topology_names`), or a graph from a TOML file (a path ending in .toml).

    link: the cards' own link (default: the preset's, pcie-gen5-x16 for the
    original four). num_cards None takes a fixed-size preset's or the file's
    own count. tenants: groups of cards of instances stepped together (see
    `topo_tenants`). options: host_latency_ns (host-staged), cards_per_leaf
    and uplink (switch-tree), cards_per_node and network (multi-node).
    """
    spec = None if link is None else link if isinstance(link, LinkSpec) else get_link(link)
    if str(name).endswith(".toml"):
        if options:
            raise ValueError(f"{name}: a topology file takes no options, got {sorted(options)}")
        graph, file_name, card_link = topo_toml.load(name, spec)
        topo = Topology(graph, file_name, card_link, tenants)
    else:
        graph, card_link = topo_presets.build(name, num_cards, spec, **options)
        topo = Topology(graph, name, card_link, tenants)
    if num_cards is not None and topo.num_cards != num_cards:
        raise ValueError(f"topology {name} has {topo.num_cards} cards, not {num_cards}")
    return topo


def topology_for(name: str, num_cards: int, link: str | LinkSpec | None = None, *, tenants=(),
                 **options) -> Topology:
    """A topology that holds ``num_cards`` cards or more: a fixed-size preset or a file keeps its own
    cards (the caller uses the first ``num_cards``), any other preset is built for ``num_cards``."""
    fixed = str(name).endswith(".toml") or topo_presets.get(name).size is not None
    topo = get_topology(name, None if fixed else num_cards, link, tenants=tenants, **options)
    if topo.num_cards < num_cards:
        raise ValueError(f"topology {topo.name} has {topo.num_cards} cards, fewer than the {num_cards} asked for")
    return topo


def topology_names() -> list[str]:
    return topo_presets.names()
