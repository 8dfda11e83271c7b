"""The PCIe-fabric study: two 8-card MI300X-class boxes joined by PCIe Gen4 cables and switches.

Names are `{1s,2s}-{1rp,2rp}-{std,split}-{cascade,flat}`: s is the number of
CPU sockets used, rp the number of root ports per socket that lead to the
switches, std or split the cabling, cascade or flat the form of the boxes.

* Box: 8 cards, joined in a full mesh of Infinity Fabric links (7 per card).
  Box b holds cards 8b .. 8b+7. Its PCIe switch is partitioned, one
  partition (`box{b}-sw{p}`) per cable, since a switch partition has one
  upstream port: a box in cascade form exposes 2 cables (4 cards each), in
  flat form 4 (2 cards each).
* Host side: one PCIe switch (`sw{k}`) with six x16 ports (one up, five
  down) per root port (`rp{k}`, k = socket x root ports + port), cabled to
  it; root ports hang from their socket (`cpu{s}`), the sockets are joined by
  the inter-socket link.
* std: a box's cables go to the switches of its own root ports (box b to
  socket b with two sockets), so box-to-box traffic climbs to the root
  complex and, with two sockets, crosses the inter-socket link; with a single
  root port both boxes share its switch and traffic turns there.
* split (rail-like): every switch takes one cable from each box (partition p
  of either box to switch p), so box-to-box traffic between the same
  partitions turns in the switch without reaching the host.

Links: cards on `pcie-gen4-x16` (the card link), cables on
`pcie-gen4-x16-cable`, root-complex forwarding on `root-complex-gen4`,
sockets on `xgmi-epyc-x4`, the box mesh on `infinity-fabric-mi300x`
(sources in interconnect/links.py).
"""
from __future__ import annotations

import networkx as nx

from interconnect.links import LinkSpec, get_link
from interconnect.topo_graph import CARD, CPU, ROOT_PORT, SWITCH, GraphBuilder
from interconnect.topo_presets import preset

BOX_CARDS = 8
NUM_BOXES = 2
SWITCH_DOWN_PORTS = 5  # six x16 ports, one of them upstream
CABLES = {"cascade": 2, "flat": 4}


def build_study(sockets: int, root_ports: int, cabling: str, form: str, link: LinkSpec,
                where: str = "study") -> nx.Graph:
    cable, rc = get_link("pcie-gen4-x16-cable"), get_link("root-complex-gen4")
    b = GraphBuilder(where)
    num_switches = sockets * root_ports
    for s in range(sockets):
        b.node(f"cpu{s}", CPU)
    if sockets == 2:
        b.edge("cpu0", "cpu1", get_link("xgmi-epyc-x4"), port="cpu0-cpu1")
    for k in range(num_switches):
        b.node(f"rp{k}", ROOT_PORT)
        b.edge(f"rp{k}", f"cpu{k // root_ports}", rc)
        b.node(f"sw{k}", SWITCH)
        b.edge(f"sw{k}", f"rp{k}", cable)

    cables = CABLES[form]
    per_cable = BOX_CARDS // cables
    down = [0] * num_switches
    fabric = get_link("infinity-fabric-mi300x")
    for box in range(NUM_BOXES):
        cards = [b.node(f"card{box * BOX_CARDS + i}", CARD) for i in range(BOX_CARDS)]
        for p in range(cables):
            part = b.node(f"box{box}-sw{p}", SWITCH)
            for card in cards[p * per_cable:(p + 1) * per_cable]:
                b.edge(card, part, link)
            k = _switch_of(box, p, cables, num_switches, cabling)
            b.edge(part, f"sw{k}", cable)
            down[k] += 1
            if down[k] > SWITCH_DOWN_PORTS:
                raise b.error(f"switch sw{k} needs more than {SWITCH_DOWN_PORTS} downstream ports")
        for i, a in enumerate(cards):
            for c in cards[i + 1:]:
                b.edge(a, c, fabric)
    return b.build()


def _switch_of(box: int, part: int, cables: int, num_switches: int, cabling: str) -> int:
    """Which host switch the cable of a box partition goes to (partitions spread in order)."""
    if cabling == "split":
        return part * num_switches // cables
    own = max(num_switches // NUM_BOXES, 1)  # std: the switches of the box's own root ports
    first = box * own if num_switches >= NUM_BOXES else 0
    return first + part * own // cables


def _register(sockets: int, root_ports: int, cabling: str, form: str) -> None:
    name = f"{sockets}s-{root_ports}rp-{cabling}-{form}"

    def build(num_cards: int, link: LinkSpec) -> nx.Graph:
        return build_study(sockets, root_ports, cabling, form, link, where=name)

    preset(name, default_link="pcie-gen4-x16", size=NUM_BOXES * BOX_CARDS)(build)


for _args in [(1, 1, "std", "cascade"), (1, 2, "std", "cascade"), (1, 2, "split", "cascade"),
              (2, 2, "std", "flat"), (2, 2, "split", "flat")]:
    _register(*_args)
