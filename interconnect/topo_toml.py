"""A topology written as a TOML file (``--topology my-system.toml``).

::

    name = "two-switches"            # optional; default: the file's name
    link = "pcie-gen4-x16"           # link of an edge that names none (default: the --link given)
    edges = [                        # [card side, host side] or [card side, host side, link]
      ["card0", "sw0"], ["card1", "sw0"], ["card2", "sw1"], ["card3", "sw1"],
      ["sw0", "rp0", "pcie-gen4-x16-cable"], ["sw1", "rp1", "pcie-gen4-x16-cable"],
      ["rp0", "cpu0", "root-complex-gen4"], ["rp1", "cpu0", "root-complex-gen4"],
      ["card0", "card1", "my-fabric"],   # card to card: a direct fabric link
    ]

    [nodes]                          # name = kind, or a table with options; cards rank in this order
    card0 = "card"
    card1 = "card"
    card2 = "card"
    card3 = "card"
    sw0 = "switch"
    sw1 = "switch"
    rp0 = "root-port"
    rp1 = "root-port"
    cpu0 = { kind = "cpu", p2p = true, host_latency_ns = 500 }

    [links.my-fabric]                # links of your own, with the fields of LinkSpec
    bandwidth_gbps = 50.0
    raw_gbps = 64.0
    latency_ns = 700
    duplex = true
    source = "where the figures come from"

Kinds: card, switch, root-port, cpu, nic, net-switch. A cpu with
``p2p = false`` stores messages through it in host memory. Named links are
the presets of interconnect.links plus the file's own. Errors name the node
or edge at fault.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import networkx as nx

from interconnect.links import LinkSpec, get_link
from interconnect.topo_graph import GraphBuilder

_KEYS = {"name", "link", "nodes", "edges", "links"}


def read_toml(path: str | Path, what: str) -> dict:
    """The document of a TOML file; a missing or malformed file is a ValueError naming it and ``what`` it is."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"no {what} file at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def load(path: str | Path, default_link: LinkSpec | None = None) -> tuple[nx.Graph, str, LinkSpec]:
    """(graph, name, card link) of a topology file; default_link serves edges that name no link."""
    path = Path(path)
    doc = read_toml(path, "topology")
    b = GraphBuilder(str(path))
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise b.error(f"unknown keys {unknown}; known: {sorted(_KEYS)}")
    links = _own_links(b, doc.get("links", {}))

    def link_named(name, where: str) -> LinkSpec:
        if isinstance(name, str) and name in links:
            return links[name]
        try:
            return get_link(name)
        except ValueError as exc:
            raise b.error(f"{where}: {exc}; or define it under [links.{name}]") from None

    default = link_named(doc["link"], "link") if "link" in doc else default_link or get_link("pcie-gen5-x16")
    nodes = doc.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise b.error("no [nodes] table")
    for name, value in nodes.items():
        options = {"kind": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else None
        if options is None or "kind" not in options:
            raise b.error(f"node {name}: give a kind, as {name} = \"switch\" or {name} = {{ kind = \"cpu\" }}")
        b.node(name, options.pop("kind"), **options)
    edges = doc.get("edges", [])
    if not isinstance(edges, list):
        raise b.error("edges must be a list of [card side, host side, link] entries")
    for edge in edges:
        if not isinstance(edge, list) or len(edge) not in (2, 3) or not all(isinstance(x, str) for x in edge):
            raise b.error(f"edge {edge!r}: write [card side, host side] or [card side, host side, link]")
        lower, upper = edge[:2]
        b.edge(lower, upper, link_named(edge[2], f"edge {lower}-{upper}") if len(edge) == 3 else default)
    return b.build(), str(doc.get("name", path.stem)), default


def _own_links(b: GraphBuilder, table) -> dict[str, LinkSpec]:
    if not isinstance(table, dict):
        raise b.error("links must be a table of [links.NAME] tables")
    out = {}
    for name, fields in table.items():
        if not isinstance(fields, dict):
            raise b.error(f"link {name}: write it as a [links.{name}] table")
        try:
            out[name] = LinkSpec(name=name, **fields)
        except (TypeError, ValueError) as exc:
            raise b.error(f"link {name}: {exc}") from None
    return out
