"""Composition of Experts: a pool of expert models sharing the same cards, and what a switch costs.

Every expert's shards stay in a staging tier: the card's DDR tier where it has
one, else host memory reached over the card's host link. An expert becomes
active by copying its shards into device memory; when device memory is full
the least recently used expert that no request is using is evicted (dropping
it costs nothing: the staging tier still holds it).

The pool is a plain object on the emulated clock (no sockets, no tensors), so
a benchmark, a replay and a test drive the same code.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import networkx as nx

from devices.memory import fmt_bytes
from devices.spec import DeviceSpec
from devices.tiers import HOST_BYTES_PER_CARD, MemoryTier, OutOfTierMemory, TieredMemory, staging_tier
from interconnect.links import exact_gbps, get_link, serialise_ns
from interconnect.topo_graph import CPU
from interconnect.topo_maxmin import max_min_rates
from interconnect.topology import Topology, get_topology


@dataclass(slots=True, frozen=True)
class SwitchPath:
    """How an expert's shards reach the cards' device memory.

    ``ddr``: each card copies from its own DDR tier, at the slower of the DDR and device-memory
    rates, no card sharing anything. ``host``: every card reads host memory over the PCIe tree of
    ``topology`` at once; flows that share a link split it by max-min fairness.
    """

    source: str  # "ddr" or "host"
    spec: DeviceSpec
    topology: Topology | None = None  # for "host"

    def describe(self) -> str:
        if self.source == "ddr":
            return f"DDR -> HBM at {min(self.spec.ddr_bw, self.spec.memory_bw) / 1e9:g} GB/s per card"
        return f"host DRAM -> device memory over {self.topology.link.name} ({self.topology.name} topology)"

    def copy_ns(self, nbytes: int) -> int:
        """Emulated time until every card holds its ``nbytes`` shard, in ns."""
        if self.source == "ddr":
            return serialise_ns(nbytes, exact_gbps(min(self.spec.ddr_bw, self.spec.memory_bw) / 1e9))
        return host_copy_ns(self.topology, nbytes)


def switch_path(spec: DeviceSpec, source: str | None = None, *, num_cards: int = 1,
                topology: str = "switch") -> SwitchPath:
    """The copy path on ``num_cards`` cards of ``spec``: their DDR tier if they have one, else host memory
    over ``topology`` (a preset or a .toml file, as the cluster takes)."""
    if source is None:
        source = "ddr" if spec.ddr_bytes else "host"
    staging_tier(spec, source)  # an unknown tier, or one this card lacks, is named
    if source == "ddr":
        return SwitchPath("ddr", spec)
    return SwitchPath("host", spec, get_topology(topology, num_cards, spec.host_link))


def host_copy_ns(topo: Topology, nbytes: int) -> int:
    """Every card of ``topo`` reads ``nbytes`` from the host memory of its nearest socket at once.

    Each flow runs down the PCIe tree from the socket to its card; flows that
    cross the same link direction share it max-min fairly. A card's copy takes
    the root complex's DRAM read latency plus its hops' latencies plus
    ceil(nbytes / its rate); the switch ends when the last card's copy does.
    """
    g = topo.graph
    cpus = [n for n, d in g.nodes(data=True) if d["kind"] == CPU]
    paths, latency, capacity = {}, {}, {}
    for card in topo.cards:
        _, route = nx.multi_source_dijkstra(g, cpus, target=card)  # socket ... card, fewest hops
        chans = []
        lat = g.nodes[route[0]]["host_latency_ns"]
        for a, b in zip(route, route[1:]):
            e = g.edges[a, b]
            chan = (e["port"], "down" if b == e["lower"] else "up")
            capacity[chan] = exact_gbps(e["spec"].bandwidth_gbps)
            chans.append(chan)
            lat += e["spec"].latency_ns
        paths[card], latency[card] = chans, lat
    rates = max_min_rates(paths, capacity)
    return max(latency[c] + serialise_ns(nbytes, rates[c]) for c in topo.cards)


@dataclass(slots=True, frozen=True)
class Switch:
    expert: str
    hit: bool  # already in device memory: no copy
    nbytes: int  # bytes copied per card
    ns: int  # emulated copy time
    evicted: tuple[str, ...]  # experts dropped from device memory to make room, oldest first


class ExpertPool:
    """Experts (name -> weight bytes per card) staged on cards of ``spec``; LRU residency in device memory.

    ``device_bytes``: device memory per card the experts may use (default: all of it minus
    ``reserved_bytes`` for the KV cache and activations).
    """

    def __init__(self, spec: DeviceSpec, experts: dict[str, int], *, source: str | None = None,
                 reserved_bytes: int = 0, num_cards: int = 1, topology: str = "switch",
                 host_bytes_per_card: int = HOST_BYTES_PER_CARD):
        if not experts:
            raise ValueError("an expert pool needs at least one expert")
        self.spec = spec
        self.path = switch_path(spec, source, num_cards=num_cards, topology=topology)
        tiers = spec.tiers()
        device = tiers["device"]
        tiers["device"] = MemoryTier("device", device.capacity - reserved_bytes, device.bandwidth)
        if self.path.source == "host":
            tiers["host"] = MemoryTier("host", host_bytes_per_card, get_link(spec.host_link).bandwidth_gbps * 1e9)
        self.memory = TieredMemory(0, tiers)
        self.experts = dict(experts)
        for name, nbytes in self.experts.items():
            if nbytes > tiers["device"].capacity:
                raise OutOfTierMemory(
                    f"expert {name!r} needs {fmt_bytes(nbytes)} per card, more than the device tier of "
                    f"{spec.name} holds on its own ({fmt_bytes(tiers['device'].capacity)}, missing "
                    f"{fmt_bytes(nbytes - tiers['device'].capacity)}); shard it over more cards")
        for name, nbytes in self.experts.items():
            self.memory.reserve(self.path.source, nbytes, f"expert {name!r}")
        self.resident: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.in_use: dict[str, int] = {}  # expert -> requests running on it
        self.num_switches = 0
        self.switch_ns_total = 0

    def _check(self, name: str) -> int:
        try:
            return self.experts[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; the pool serves: {', '.join(self.experts)}") from None

    def activate(self, name: str) -> Switch:
        """Make ``name`` resident in device memory, evicting least recently used idle experts as needed."""
        nbytes = self._check(name)
        if name in self.resident:
            self.resident.move_to_end(name)
            return Switch(name, True, 0, 0, ())
        evicted = []
        while not self.memory.can_reserve("device", nbytes):
            victim = next((e for e in self.resident if not self.in_use.get(e)), None)
            if victim is None:
                raise OutOfTierMemory(
                    f"expert {name!r} needs {fmt_bytes(nbytes)} of device memory; "
                    f"{fmt_bytes(self.memory.free('device'))} is free and every resident expert is in use")
            self.memory.release("device", self.resident.pop(victim))
            evicted.append(victim)
        self.memory.reserve("device", nbytes, f"expert {name!r}")
        self.resident[name] = nbytes
        ns = self.path.copy_ns(nbytes)
        self.num_switches += 1
        self.switch_ns_total += ns
        return Switch(name, False, nbytes, ns, tuple(evicted))

    def acquire(self, name: str) -> Switch:
        """Activate ``name`` and hold it resident until ``release``."""
        sw = self.activate(name)
        self.in_use[name] = self.in_use.get(name, 0) + 1
        return sw

    def release(self, name: str) -> None:
        n = self.in_use.get(name, 0)
        if n == 0:
            raise ValueError(f"expert {name!r} is not in use")
        self.in_use[name] = n - 1
