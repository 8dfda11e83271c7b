"""rsd-launch topo: a topology's card-to-card matrix, as `nvidia-smi topo -m` prints one.

    rsd-launch topo --topology 2s-2rp-split-flat      # labels, bottleneck GB/s, legend
    rsd-launch topo --topology switch-tree --devices 8 --json
    rsd-launch topo --topology my-system.toml --png my-system.png

Fixed-size presets and TOML files have their own number of cards; --devices
sizes the others.
"""
from __future__ import annotations

import json

import networkx as nx

from interconnect import topo_presets
from interconnect.topo_graph import CARD, FABRIC, SOCKET
from interconnect.topology import LEGEND, Topology, get_topology
from rsd_runtime.cli import COMMANDS, command


def _topo_args(p):
    p.add_argument("--topology", default="switch", metavar="NAME",
                   help=f"a preset ({', '.join(topo_presets.names())}) or a .toml file")
    p.add_argument("--link", default=None, help="the cards' own link (default: the topology's)")
    p.add_argument("--png", metavar="FILE", help="also draw the graph into FILE")


def topology_from_args(args) -> Topology:
    fixed = args.topology.endswith(".toml") or topo_presets.get(args.topology).size is not None
    return get_topology(args.topology, None if fixed else args.devices, args.link)


def matrices(topo: Topology) -> dict:
    """The card-to-card tables: label, bottleneck GB/s and one-way latency of every pair."""
    n = range(topo.num_cards)
    return {
        "labels": [[topo.relation(a, b) for b in n] for a in n],
        "bottleneck_gbps": [[None if a == b else topo.bottleneck_gbps(a, b) for b in n] for a in n],
        "latency_ns": [[None if a == b else topo.latency_ns(a, b) for b in n] for a in n],
    }


def _table(names: list[str], rows: list[list[str]]) -> list[str]:
    width = max(len(s) for s in names + [c for row in rows for c in row]) + 2
    lines = [" " * width + "".join(f"{s:>{width}}" for s in names)]
    lines += [f"{name:<{width}}" + "".join(f"{c:>{width}}" for c in row) for name, row in zip(names, rows)]
    return lines


def format_topology(topo: Topology) -> str:
    m = matrices(topo)
    bw = [["X" if v is None else f"{v:.2f}" for v in row] for row in m["bottleneck_gbps"]]
    used = {label for row in m["labels"] for label in row}
    key = max(len(label) for label in LEGEND)
    return "\n".join([
        f"rsd-runtime topology {topo.name}: {topo.num_cards} cards, card link {topo.link.name}", "",
        *_table(topo.cards, m["labels"]), "",
        "Bottleneck bandwidth, GB/s per direction (one flow alone on the fabric):", "",
        *_table(topo.cards, bw), "",
        "Legend:", "",
        *[f"  {label:<{key}} = {text}" for label, text in LEGEND.items() if label in used],
    ])


def _layout(g: nx.Graph, cards: list[str]) -> dict[str, tuple[float, float]]:
    """Cards in a row by rank; every other node as high as its distance to the nearest card, above them."""
    tree = nx.restricted_view(g, [], [(a, b) for a, b, k in g.edges(data="kind") if k == FABRIC])
    dist = {card: nx.single_source_shortest_path_length(tree, card) for card in cards}
    pos = {}
    for i, node in enumerate(g):
        near = [d[node] for d in dist.values() if node in d]
        height = min(near, default=len(g))
        xs = [rank for rank, d in enumerate(dist.values()) if d.get(node) == height] or [i]
        pos[node] = (sum(xs) / len(xs), float(height))
    return pos


def draw_png(topo: Topology, path: str) -> None:
    """The graph: cards in a row at the bottom, each node above the cards nearest to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = topo.graph
    pos = _layout(g, topo.cards)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * g.number_of_nodes() ** 0.9), 6))
    links = sorted({spec.name for *_, spec in g.edges(data="spec")})
    colors = dict(zip(links, plt.get_cmap("tab10").colors))
    for kind, style, rad in ((FABRIC, "dashed", 0.3), (SOCKET, "solid", 0.0), ("tree", "solid", 0.0)):
        edges = [(a, b) for a, b, k in g.edges(data="kind") if k == kind]
        curve = {"arrows": True, "arrowstyle": "-", "connectionstyle": f"arc3,rad={rad}"} if rad else {}
        nx.draw_networkx_edges(g, pos, edgelist=edges, ax=ax, style=style, alpha=0.6,
                               edge_color=[colors[g.edges[e]["spec"].name] for e in edges], **curve)
    kinds = dict(g.nodes(data="kind"))
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=500,
                           node_color=["tab:green" if kinds[n] == CARD else "lightgray" for n in g])
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=6)
    for name, color in colors.items():
        ax.plot([], [], color=color, label=name)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"{topo.name}: {topo.num_cards} cards")
    ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


@command("topo", "print a topology's card-to-card matrix (labels as nvidia-smi topo -m) and bottleneck "
                 "bandwidth; --png draws the graph", _topo_args, shared=("devices", "json"))
def cmd_topo(args) -> int:
    topo = topology_from_args(args)
    if args.json:
        print(json.dumps({"topology": topo.name, "num_cards": topo.num_cards, "card_link": topo.link.name,
                          "cards": topo.cards, **matrices(topo), "legend": LEGEND}, indent=2))
    else:
        print(format_topology(topo))
    if args.png:
        draw_png(topo, args.png)
    return 0


COMMAND = COMMANDS["topo"]  # for a CLI module run as __main__, whose registry is another copy
