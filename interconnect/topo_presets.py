"""Named topologies, each built as a graph: a registry of builders.

A builder takes (num_cards, card link or None for its default, **options)
and returns (graph, card link). Fixed-size presets (the PCIe-fabric study,
`topo_study`) have `size`; the others take any number of cards.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx

from interconnect.links import LinkSpec, get_link
from interconnect.topo_graph import CARD, CPU, NET_SWITCH, SWITCH, GraphBuilder, HOST_LATENCY_NS

GEN5 = "pcie-gen5-x16"


@dataclass(slots=True, frozen=True)
class Preset:
    build: Callable[..., nx.Graph]
    default_link: str
    size: int | None = None  # fixed card count, or None: a parameter


_PRESETS: dict[str, Preset] = {}


def preset(name: str, default_link: str = GEN5, size: int | None = None):
    def register(fn):
        _PRESETS[name] = Preset(fn, default_link, size)
        return fn
    return register


def names() -> list[str]:
    _load_study()
    return list(_PRESETS)


def get(name: str) -> Preset:
    _load_study()
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown topology {name!r}; known topologies: {', '.join(_PRESETS)} "
                         f"(or a .toml file describing one)") from None


def build(name: str, num_cards: int | None, link: LinkSpec | None, **options) -> tuple[nx.Graph, LinkSpec]:
    p = get(name)
    if num_cards is None:
        if p.size is None:
            raise ValueError(f"topology {name} needs a number of cards")
        num_cards = p.size
    if not isinstance(num_cards, int) or isinstance(num_cards, bool) or num_cards < 1:
        raise ValueError(f"num_cards must be a positive int, got {num_cards!r}")
    if p.size is not None and num_cards != p.size:
        raise ValueError(f"topology {name} has {p.size} cards, not {num_cards}")
    link = link or get_link(p.default_link)
    return p.build(num_cards, link, **options), link


def _load_study() -> None:
    from interconnect import topo_study  # noqa: F401  registers the study presets


def _spec(link: str | LinkSpec) -> LinkSpec:
    return link if isinstance(link, LinkSpec) else get_link(link)


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _cards(b: GraphBuilder, num_cards: int) -> list[str]:
    return [b.node(f"card{i}", CARD) for i in range(num_cards)]


@preset("switch")
def switch(num_cards: int, link: LinkSpec) -> nx.Graph:
    """All cards under one PCIe switch, P2P: card src uplink -> switch -> card dst downlink.

    Two hops, cut-through. Each hop's latency is one endpoint's stages plus
    half the switch, so the 2 x latency_ns of a path is one switch traversal
    end to end (700 ns on pcie-gen5-x16). Time: 2*L + ceil(n / B).
    """
    b = GraphBuilder("switch")
    b.node("cpu0", CPU)
    b.node("sw0", SWITCH)
    b.edge("sw0", "cpu0", link)
    for card in _cards(b, num_cards):
        b.edge(card, "sw0", link)
    return b.build()


@preset("host-staged")
def host_staged(num_cards: int, link: LinkSpec, host_latency_ns: int = HOST_LATENCY_NS) -> nx.Graph:
    """No P2P: card src -> root complex -> host memory, then host memory -> root complex -> card dst.

    Two store-and-forward stages, each a full transfer on one card's root-port
    link, each paying host_latency_ns for the root complex and DRAM. For a
    transfer alone on the fabric, with L = link latency, H = host_latency_ns,
    B = link bandwidth:
        T_host(n)   = 2*(L + H) + 2*ceil(n / B)
        T_switch(n) = 2*L + ceil(n / B)
        T_host(n)   = 2*T_switch(n) + 2*(H - L)     (+300 ns on the defaults)
    so the ratio tends to 2 for large messages. Host DRAM bandwidth (hundreds
    of GB/s) is not modelled as a shared limit.
    """
    b = GraphBuilder("host-staged")
    if not isinstance(host_latency_ns, int) or isinstance(host_latency_ns, bool) or host_latency_ns < 0:
        raise ValueError(f"host_latency_ns must be a non-negative int, got {host_latency_ns!r}")
    b.node("cpu0", CPU, p2p=False, host_latency_ns=host_latency_ns)
    for card in _cards(b, num_cards):
        b.edge(card, "cpu0", link)
    return b.build()


def _grouped(b: GraphBuilder, num_cards: int, link: LinkSpec, group_size: int, group: str) -> list[str]:
    """Cards in consecutive groups of group_size, each group under one PCIe switch."""
    _positive("group size", group_size)
    cards = _cards(b, num_cards)
    switches = []
    for g in range(-(-num_cards // group_size)):
        switches.append(b.node(group.format(g), SWITCH))
        for card in cards[g * group_size:(g + 1) * group_size]:
            b.edge(card, switches[-1], link)
    return switches


@preset("switch-tree")
def switch_tree(num_cards: int, link: LinkSpec, cards_per_leaf: int = 4, uplink: str | LinkSpec | None = None):
    """Leaf PCIe switches of cards_per_leaf cards under one root switch (GigaIO-style study).

    Across leaves: card up -> leaf uplink -> root -> peer leaf downlink -> card
    down, four hops cut-through, so every cross-leaf flow leaving (entering) a
    leaf shares its uplink (downlink) direction. Cross-leaf latency is 4 hops
    (1400 ns on pcie-gen5-x16) against 2 within a leaf; the uplink defaults
    to the card link.
    """
    b = GraphBuilder("switch-tree")
    b.node("cpu0", CPU)
    b.node("root", SWITCH)
    b.edge("root", "cpu0", link)
    up = link if uplink is None else _spec(uplink)
    for leaf in _grouped(b, num_cards, link, cards_per_leaf, "leaf{}"):
        b.edge(leaf, "root", up)
    return b.build()


@preset("multi-node")
def multi_node(num_cards: int, link: LinkSpec, cards_per_node: int = 8, network: str | LinkSpec = "ib-ndr"):
    """Nodes of cards_per_node cards under a PCIe switch, one NIC per node on a network switch.

    The NIC's own PCIe port (Gen5 x16, 55 GB/s) is faster than the network
    and carries the same flows, so it is folded into the NIC hop (port
    `node{i}-nic`). Each node has its own host (a CPU above its switch).
    """
    b = GraphBuilder("multi-node")
    net = _spec(network)
    b.node("net", NET_SWITCH)
    for i, sw in enumerate(_grouped(b, num_cards, link, cards_per_node, "node{}")):
        b.node(f"cpu{i}", CPU)
        b.edge(sw, f"cpu{i}", link)
        b.edge(sw, "net", net, port=f"{sw}-nic")
    return b.build()
