"""The topology graph: nodes of known kinds, edges that carry a link spec, and its checks.

A node is a card, a PCIe switch, a CPU root port, a CPU socket (its root
complex), a NIC or a network switch. An edge is one physical link, written
from the card side: (lower, upper). Crossing it lower -> upper is UP, the
other way DOWN; each direction of a duplex link is its own channel. Three
kinds of edge:

* fabric: card to card, a direct Infinity-Fabric- or NVLink-class link;
* socket: CPU to CPU, the inter-socket link;
* tree: everything else, the PCIe tree of each socket and the network.

The PCIe part of the tree edges (those not touching a network switch) must
hold no loop, and every card must reach every other card, by the tree or by a
fabric link of its own. A socket with ``p2p = False`` does not forward
peer-to-peer: a message through it is stored whole in host memory and sent
on, each store and each read-back paying ``host_latency_ns``.
"""
from __future__ import annotations

import networkx as nx

from interconnect.links import LinkSpec

CARD, SWITCH, ROOT_PORT, CPU, NIC, NET_SWITCH = "card", "switch", "root-port", "cpu", "nic", "net-switch"
KINDS = (CARD, SWITCH, ROOT_PORT, CPU, NIC, NET_SWITCH)
FABRIC, SOCKET, TREE = "fabric", "socket", "tree"

# Root complex plus DRAM: a DMA read of host memory costs about half a
# microsecond (Neugebauer et al., "Understanding PCIe performance for end host
# networking", SIGCOMM 2018).
HOST_LATENCY_NS = 500

_OPTIONS = {CPU: {"p2p": bool, "host_latency_ns": int}}


class GraphBuilder:
    """Collects nodes and edges in order; `build` checks them and returns the graph.

    Card ranks follow the order cards are added.
    """

    def __init__(self, where: str = "topology"):
        self.where = where  # prefix of error messages: a file name or a preset
        self.graph = nx.Graph()
        self._edges: list[tuple[str, str, LinkSpec, str | None]] = []

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

    def node(self, name: str, kind: str, **options) -> str:
        if not isinstance(name, str) or not name:
            raise self.error(f"a node name must be a non-empty string, got {name!r}")
        if name in self.graph:
            raise self.error(f"node {name} is defined twice")
        if kind not in KINDS:
            raise self.error(f"node {name}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        known = _OPTIONS.get(kind, {})
        for key, value in options.items():
            if key not in known:
                raise self.error(f"node {name}: unknown option {key!r} for a {kind}"
                                 + (f"; known: {', '.join(known)}" if known else ""))
            if not isinstance(value, known[key]) or (known[key] is int and isinstance(value, bool)):
                raise self.error(f"node {name}: {key} must be {known[key].__name__}, got {value!r}")
        attrs = {"kind": kind}
        if kind == CPU:
            attrs["p2p"] = options.get("p2p", True)
            attrs["host_latency_ns"] = options.get("host_latency_ns", HOST_LATENCY_NS)
            if attrs["host_latency_ns"] < 0:
                raise self.error(f"node {name}: host_latency_ns must be >= 0, got {attrs['host_latency_ns']}")
        self.graph.add_node(name, **attrs)
        return name

    def edge(self, lower: str, upper: str, link: LinkSpec, port: str | None = None) -> None:
        for end in (lower, upper):
            if end not in self.graph:
                raise self.error(f"edge {lower}-{upper}: unknown node {end!r}")
        if lower == upper:
            raise self.error(f"edge {lower}-{upper} joins a node to itself")
        if self.graph.has_edge(lower, upper):
            raise self.error(f"edge {lower}-{upper} is listed twice")
        kinds = {self.graph.nodes[lower]["kind"], self.graph.nodes[upper]["kind"]}
        kind = FABRIC if kinds == {CARD} else SOCKET if kinds == {CPU} else TREE
        self.graph.add_edge(lower, upper, spec=link, lower=lower, upper=upper, kind=kind)
        self._edges.append((lower, upper, link, port))

    def build(self) -> nx.Graph:
        g = self.graph
        cards = [n for n, kind in g.nodes(data="kind") if kind == CARD]
        if not cards:
            raise self.error("no cards")
        for rank, card in enumerate(cards):
            g.nodes[card]["rank"] = rank
        self._name_ports()
        self._check_pcie_loops()
        self._check_card_paths(cards)
        g.graph["cards"] = cards
        return g

    def _name_ports(self) -> None:
        """Port of an edge: its own name, else its lower node's (one uplink), else lower-upper."""
        uplinks: dict[str, int] = {}
        for lower, upper, _, port in self._edges:
            if port is None and self.graph.edges[lower, upper]["kind"] == TREE:
                uplinks[lower] = uplinks.get(lower, 0) + 1
        seen: dict[str, str] = {}
        for lower, upper, _, port in self._edges:
            data = self.graph.edges[lower, upper]
            if port is None:
                port = lower if data["kind"] == TREE and uplinks[lower] == 1 else f"{lower}-{upper}"
            if port in seen:
                raise self.error(f"edges {seen[port]} and {lower}-{upper} have the same port name {port!r}")
            seen[port] = f"{lower}-{upper}"
            data["port"] = port

    def _pcie_edges(self):
        g = self.graph
        return [(a, b) for a, b, kind in g.edges(data="kind") if kind == TREE
                and NET_SWITCH not in (g.nodes[a]["kind"], g.nodes[b]["kind"])]

    def _check_pcie_loops(self) -> None:
        try:
            cycle = nx.find_cycle(nx.Graph(self._pcie_edges()))
        except nx.NetworkXNoCycle:
            return
        loop = " - ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise self.error(f"PCIe loop {loop}: a PCIe tree has exactly one path between two nodes")

    def _check_card_paths(self, cards: list[str]) -> None:
        g = self.graph
        groups = [[c for c in cards if c in comp] for comp in nx.connected_components(tree_view(g))]
        groups = sorted((grp for grp in groups if grp), key=len)  # the smallest group names the culprit
        for i, group in enumerate(groups):
            for a in group:
                for other in groups[i + 1:]:
                    for b in other:
                        if not g.has_edge(a, b):
                            raise self.error(f"card {a} has no path to card {b}: no PCIe or network route "
                                             "and no direct fabric link between them")


def tree_view(g: nx.Graph) -> nx.Graph:
    """The graph without its fabric edges: where routes that are not one fabric hop run."""
    return nx.restricted_view(g, [], [(a, b) for a, b, kind in g.edges(data="kind") if kind == FABRIC])
