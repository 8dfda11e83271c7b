"""Topologies: the links a message from card src to card dst crosses, and what it costs.

A link instance is one direction of one port (`LinkId`), so that traffic in
opposite directions of a full-duplex link does not contend, while flows that
cross the same direction of the same port do. Contention is equal share, for
one set of flows that run at once (one step of a collective): each flow gets
min over its hops of (hop bandwidth / flows on that hop), with both directions
of a half-duplex link counted together. All times are integer nanoseconds.
"""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from interconnect.links import LinkSpec, exact_gbps, get_link, serialise_ns

UP = "up"  # towards the switch, host or network
DOWN = "down"  # away from it, towards a card

Flow = tuple[int, int]


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


def _spec(link: str | LinkSpec) -> LinkSpec:
    return link if isinstance(link, LinkSpec) else get_link(link)


class Topology:
    """Base: subclasses give `_stages`, the path cut where a message is stored whole.

    A stage is cut-through: its bandwidth term is counted once however many
    hops it has. A message pays, per stage, the stage's hop latencies plus
    `stage_overhead_ns`, plus ceil(nbytes / stage bottleneck bandwidth).
    """

    name = "base"
    stage_overhead_ns = 0

    def __init__(self, num_cards: int, link: str | LinkSpec = "pcie-gen5-x16"):
        if not isinstance(num_cards, int) or num_cards < 1:
            raise ValueError(f"num_cards must be a positive int, got {num_cards!r}")
        self.num_cards = num_cards
        self.link = _spec(link)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_cards={self.num_cards}, link={self.link.name!r})"

    def _stages(self, src: int, dst: int) -> list[list[Hop]]:
        raise NotImplementedError

    def _card(self, card: int, direction: str) -> Hop:
        return Hop(LinkId(f"card{card}", direction), self.link)

    def stages(self, src: int, dst: int) -> list[list[Hop]]:
        for card in (src, dst):
            if not isinstance(card, int) or not 0 <= card < self.num_cards:
                raise ValueError(f"card {card!r} out of range for {self.num_cards} cards")
        if src == dst:
            raise ValueError(f"no path from card {src} to itself")
        return self._stages(src, dst)

    def path(self, src: int, dst: int) -> list[Hop]:
        return [hop for stage in self.stages(src, dst) for hop in stage]

    def latency_ns(self, src: int, dst: int) -> int:
        stages = self.stages(src, dst)
        return sum(h.spec.latency_ns for s in stages for h in s) + self.stage_overhead_ns * len(stages)

    def bottleneck_gbps(self, src: int, dst: int) -> float:
        return min(h.spec.bandwidth_gbps for h in self.path(src, dst))

    def _load(self, flows: Iterable[Flow]) -> Counter:
        """Concurrent streams per channel: min(distinct senders, distinct receivers) crossing it.

        A card's own port sends (receives) one message at a time, queueing the
        rest (see interconnect.emulation), so several flows from one sender, or
        to one receiver, are one stream on any link they share.
        """
        srcs: dict = {}
        dsts: dict = {}
        for src, dst in flows:
            for ch in {hop.channel for hop in self.path(src, dst)}:
                srcs.setdefault(ch, set()).add(src)
                dsts.setdefault(ch, set()).add(dst)
        return Counter({ch: min(len(srcs[ch]), len(dsts[ch])) for ch in srcs})

    @staticmethod
    def _share(hops: list[Hop], load: Counter) -> Fraction:
        return min(exact_gbps(h.spec.bandwidth_gbps) / load[h.channel] for h in hops)

    def flow_bandwidth(self, flows: list[Flow]) -> dict[Flow, float]:
        """GB/s each flow gets while all `flows` run at once (equal share per link direction).

        A pair listed twice is two flows; both get the value stored under it.
        This is the slowest hop's share, not end-to-end goodput: for a
        store-and-forward topology use transfer_time_ns.
        """
        load = self._load(flows)
        return {(s, d): float(self._share(self.path(s, d), load)) for s, d in flows}

    def transfer_time_ns(
        self, src: int, dst: int, nbytes: int, concurrent_flows: Iterable[Flow] | None = None
    ) -> int:
        """Latency + ceil(nbytes / bottleneck share), summed over stages, in integer ns.

        `concurrent_flows` is the set of flows running at the same time;
        (src, dst) is counted once whether or not it is listed.
        """
        flows = list(concurrent_flows or ())
        if (src, dst) not in flows:
            flows.append((src, dst))
        load = self._load(flows)
        total = 0
        for stage in self.stages(src, dst):
            total += sum(h.spec.latency_ns for h in stage) + self.stage_overhead_ns
            total += serialise_ns(nbytes, self._share(stage, load))
        return total


class SwitchTopology(Topology):
    """All cards under one PCIe switch, P2P: card src uplink -> switch -> card dst downlink.

    Two hops, cut-through. Each hop's latency is one endpoint's stages plus
    half the switch, so the 2 x latency_ns of a path is one switch traversal
    end to end (700 ns on pcie-gen5-x16). Time: 2*L + ceil(n / B).
    """

    name = "switch"

    def _stages(self, src, dst):
        return [[self._card(src, UP), self._card(dst, DOWN)]]


class HostStagedTopology(Topology):
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

    name = "host-staged"

    def __init__(self, num_cards: int, link: str | LinkSpec = "pcie-gen5-x16", host_latency_ns: int = 500):
        super().__init__(num_cards, link)
        # Root complex plus DRAM: a DMA read of host memory costs about half a
        # microsecond (Neugebauer et al., "Understanding PCIe performance for
        # end host networking", SIGCOMM 2018).
        if not isinstance(host_latency_ns, int) or host_latency_ns < 0:
            raise ValueError(f"host_latency_ns must be a non-negative int, got {host_latency_ns!r}")
        self.stage_overhead_ns = host_latency_ns

    def _stages(self, src, dst):
        return [[self._card(src, UP)], [self._card(dst, DOWN)]]


class _GroupedTopology(Topology):
    """Cards in groups under one PCIe switch each; groups joined by one shared uplink per group.

    Within a group: card up -> card down (as `switch`). Across groups: card up
    -> group uplink -> peer group downlink -> card down, four hops cut-through,
    so every cross-group flow leaving (entering) a group shares its uplink
    (downlink) direction.
    """

    group_port = "group{}"

    def __init__(self, num_cards: int, link: str | LinkSpec, group_size: int, uplink: str | LinkSpec):
        super().__init__(num_cards, link)
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group size must be a positive int, got {group_size!r}")
        self.group_size = group_size
        self.uplink = _spec(uplink)

    @property
    def num_groups(self) -> int:
        return -(-self.num_cards // self.group_size)

    def group_of(self, card: int) -> int:
        return card // self.group_size

    def _stages(self, src, dst):
        a, b = self.group_of(src), self.group_of(dst)
        if a == b:
            return [[self._card(src, UP), self._card(dst, DOWN)]]
        return [[
            self._card(src, UP),
            Hop(LinkId(self.group_port.format(a), UP), self.uplink),
            Hop(LinkId(self.group_port.format(b), DOWN), self.uplink),
            self._card(dst, DOWN),
        ]]


class SwitchTreeTopology(_GroupedTopology):
    """Leaf PCIe switches of cards_per_leaf cards under one root switch (GigaIO-style study).

    Cross-leaf latency is 4 hops (1400 ns on pcie-gen5-x16) against 2 within
    a leaf; the uplink defaults to the card link.
    """

    name = "switch-tree"
    group_port = "leaf{}"

    def __init__(self, num_cards, link="pcie-gen5-x16", cards_per_leaf=4, uplink=None):
        super().__init__(num_cards, link, cards_per_leaf, uplink if uplink is not None else link)


class MultiNodeTopology(_GroupedTopology):
    """Nodes of cards_per_node cards under a PCIe switch, one NIC per node on a network link.

    The NIC's own PCIe port (Gen5 x16, 55 GB/s) is faster than the network
    and carries the same flows, so it is folded into the NIC hop.
    """

    name = "multi-node"
    group_port = "node{}-nic"

    def __init__(self, num_cards, link="pcie-gen5-x16", cards_per_node=8, network="ib-ndr"):
        super().__init__(num_cards, link, cards_per_node, network)


_TOPOLOGIES: dict[str, type[Topology]] = {
    cls.name: cls for cls in (SwitchTopology, HostStagedTopology, SwitchTreeTopology, MultiNodeTopology)
}


def topology_names() -> list[str]:
    return list(_TOPOLOGIES)


def get_topology(name: str, num_cards: int, link: str | LinkSpec = "pcie-gen5-x16", **options) -> Topology:
    """Build a preset: `switch` (default), `host-staged`, `switch-tree`, `multi-node`.

    options: host_latency_ns (host-staged), cards_per_leaf and uplink
    (switch-tree), cards_per_node and network (multi-node).
    """
    try:
        cls = _TOPOLOGIES[name]
    except KeyError:
        raise ValueError(f"unknown topology {name!r}; known topologies: {', '.join(_TOPOLOGIES)}") from None
    return cls(num_cards, link, **options)
