"""Link models: one direction of one physical link, as bandwidth and latency.

Units: bandwidth in GB/s with 1 GB = 1e9 bytes, so that 1 GB/s is exactly one
byte per nanosecond and nbytes / bandwidth_gbps is a time in nanoseconds.
Times are integer nanoseconds: a bandwidth is read at its decimal value as
written (55.45 -> 1109/20) and the ceiling is taken in integer arithmetic, so
a result never depends on float rounding and repeats to the last digit.
"""

from dataclasses import dataclass
from fractions import Fraction


@dataclass(slots=True, frozen=True)
class LinkSpec:
    name: str
    bandwidth_gbps: float  # effective payload rate per direction, GB/s
    latency_ns: int  # one way, per hop of a path
    duplex: bool  # True: each direction has its own bandwidth_gbps
    raw_gbps: float  # signalling rate per direction after line coding, GB/s
    source: str

    def __post_init__(self):
        if not self.name:
            raise ValueError("link name must not be empty")
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"{self.name}: bandwidth_gbps must be positive, got {self.bandwidth_gbps}")
        if not self.raw_gbps > 0:
            raise ValueError(f"{self.name}: raw_gbps must be positive, got {self.raw_gbps}")
        if self.bandwidth_gbps > self.raw_gbps:
            raise ValueError(f"{self.name}: effective {self.bandwidth_gbps} GB/s exceeds raw {self.raw_gbps} GB/s")
        if not isinstance(self.latency_ns, int) or isinstance(self.latency_ns, bool):
            raise TypeError(f"{self.name}: latency_ns must be an int, got {type(self.latency_ns).__name__}")
        if self.latency_ns < 0:
            raise ValueError(f"{self.name}: latency_ns must be non-negative, got {self.latency_ns}")

    @property
    def efficiency(self) -> float:
        return self.bandwidth_gbps / self.raw_gbps


# PCIe efficiency for bulk posted writes with a 256-byte max payload, the
# size server root ports and switches commonly settle on. Per TLP: 4 B STP
# framing token (carries the sequence number in the 128b/130b framing of
# Gen3+, PCIe Base Spec 5.0), 16 B header (4DW, 64-bit addresses, as card
# BARs above 4 GiB need), 4 B LCRC; no ECRC.
# That is 256 / 280 = 91.4% before DLLPs (Intel AN 456 gives the same method,
# 92% with a 3DW header). If every TLP drew one Ack and one UpdateFC DLLP
# (8 B each) on a fully loaded duplex link, as the PLX PEX8532 databook's
# worst case assumes, it falls to 256 / 296 = 86.5%. Acks and credit updates
# are coalesced in practice, so we take 88%: between the two bounds, nearer
# the worst case, since collectives load both directions at once.
_PCIE_EFFICIENCY = 0.88

# One PCIe hop: one endpoint's PHY/data-link/DMA stages plus half of a switch
# traversal, so card -> switch -> card (two hops) is 700 ns one way. Broadcom
# quotes 115 ns cut-through port to port for PEX89000 (105 ns for PEX88000);
# the endpoints dominate the rest. GigaIO markets its FabreX PCIe fabric as
# sub-microsecond card to card; 700 ns sits inside the 0.5-1 us range.
_PCIE_HOP_NS = 350

_LINKS: dict[str, LinkSpec] = {
    spec.name: spec
    for spec in (
        LinkSpec(
            name="pcie-gen5-x16",
            # 63.015 * 0.88 = 55.45; raw = 32 GT/s * 16 lanes * 128/130 / 8
            bandwidth_gbps=55.45,
            latency_ns=_PCIE_HOP_NS,
            duplex=True,
            raw_gbps=63.015,
            source="PCI-SIG PCIe Base Spec 5.0 (32 GT/s, 128b/130b); Broadcom PEX89000 product brief (115 ns)",
        ),
        LinkSpec(
            name="pcie-gen4-x16",
            # 31.508 * 0.88 = 27.73; raw = 16 GT/s * 16 lanes * 128/130 / 8
            bandwidth_gbps=27.73,
            latency_ns=_PCIE_HOP_NS,
            duplex=True,
            raw_gbps=31.508,
            source="PCI-SIG PCIe Base Spec 4.0 (16 GT/s, 128b/130b); Broadcom PEX88000 (105 ns)",
        ),
        LinkSpec(
            name="ib-ndr",
            # 400 Gb/s per port per direction = 50 GB/s (NVIDIA ConnectX-7 and
            # Quantum-2 datasheets). Per 4096 B MTU packet: LRH 8 + BTH 12 +
            # ICRC 4 + VCRC 2 B (IBTA Vol. 1) -> 99.4%, 49.7 GB/s; rounded
            # down to 49.0 for ACK and credit packets.
            bandwidth_gbps=49.0,
            # One hop = one NIC (send or receive side) plus half a switch, so
            # NIC to NIC through one switch is 1.2 us, in the 1-2 us range
            # that perftest ib_write_lat reports for RDMA NICs.
            latency_ns=600,
            duplex=True,
            raw_gbps=50.0,
            source="NVIDIA ConnectX-7 / Quantum-2 datasheets (400 Gb/s NDR); IBTA Spec Vol. 1 (headers)",
        ),
        LinkSpec(
            name="roce-100g",
            # 100GBASE: 100 Gb/s = 12.5 GB/s per direction (IEEE 802.3). Per
            # 4096 B RoCEv2 payload: preamble+SFD 8, IFG 12, Ethernet 14, FCS
            # 4, IPv4 20, UDP 8, BTH 12, ICRC 4 B -> 98.0%, 12.25 GB/s; rounded
            # down to 12.0 for ACKs and PFC pauses.
            bandwidth_gbps=12.0,
            # One hop = one NIC plus half an Ethernet switch; NIC to NIC 1.8
            # us, Ethernet switches adding more than IB ones.
            latency_ns=900,
            duplex=True,
            raw_gbps=12.5,
            source="IEEE 802.3 (100GBASE); IBTA RoCEv2 Annex A17 (headers)",
        ),
        LinkSpec(
            name="pcie-gen4-x16-cable",
            # A PCIe Gen4 x16 cable between two switches (or a switch and a
            # root port): the rate of pcie-gen4-x16, but no endpoint on either
            # end, so a hop is half of each switch (one 105 ns PEX88000
            # traversal, Broadcom) plus about 2 m of copper at ~0.7 c (~10 ns).
            bandwidth_gbps=27.73,
            latency_ns=115,
            duplex=True,
            raw_gbps=31.508,
            source="PCI-SIG PCIe Base Spec 4.0; Broadcom PEX88000 product brief (105 ns port to port)",
        ),
        LinkSpec(
            name="root-complex-gen4",
            # Peer-to-peer forwarding through a CPU root complex, per root
            # port and direction: a forwarding rate, not a wire, so raw is the
            # rate itself. Measured: 7.056 GB/s P2P between two PCIe Gen3 x16
            # GPUs on one AMD EPYC 7261 (ROCm/ROCmValidationSuite issue #427),
            # 44.8% of Gen3's 15.754 GB/s against ~88% through a switch; the
            # same share of Gen4's 31.508 GB/s is 14.11 GB/s (an assumption:
            # NCCL likewise budgets 16 GB/s for GPU P2P across an AMD CPU,
            # AMD_BW in src/graph/topo.h). Newer root complexes can forward
            # near line rate; describe such a host with a faster link in TOML.
            bandwidth_gbps=14.11,
            # Assumed, no public figure: the crossing (two root-port hops)
            # costs 300 ns, about three switch traversals (105 ns, Broadcom
            # PEX88000) and under the ~500 ns of a DMA to host memory with
            # DRAM (Neugebauer et al., SIGCOMM 2018).
            latency_ns=150,
            duplex=True,
            raw_gbps=14.11,
            source="ROCm/ROCmValidationSuite#427 (EPYC P2P 7.056 GB/s at Gen3), scaled to Gen4; NCCL topo.h AMD_BW",
        ),
        LinkSpec(
            name="xgmi-epyc-x4",
            # Four xGMI links between two AMD EPYC 9004 sockets at 32 Gb/s x16:
            # 512 GB/s both directions (Lenovo Press LP1852), 256 GB/s each
            # way; the PCIe packet efficiency (88%) is assumed for its packets.
            bandwidth_gbps=225.28,
            # Cross-socket GPU P2P measured 0.44 us against 0.36 us within a
            # socket on EPYC 9005 (voipmonitor/rtx6kpro, hardware/topology.md).
            latency_ns=80,
            duplex=True,
            raw_gbps=256.0,
            source="Lenovo Press LP1852 (4 xGMI links, 512 GB/s); voipmonitor/rtx6kpro topology.md (+80 ns)",
        ),
        LinkSpec(
            name="infinity-fabric-mi300x",
            # One of the seven Infinity Fabric links from an MI300X to each peer
            # of an 8-GPU OAM platform: 64 GB/s per direction (AMD MI300X data
            # sheet; CDNA 3 white paper: 896 GB/s = 7 x 128 GB/s both ways).
            # Measured Infinity Fabric transfers reach up to 81% of peak
            # (Schieffer et al., KTH/LLNL studies of MI250X and MI300A) -> 51.84;
            # RCCL budgets 48 GB/s after protocol and FEC (ROCm/rccl#1210).
            bandwidth_gbps=51.84,
            # Assumed, no per-link figure is published: as a PCIe card-to-card
            # path through one switch (700 ns), the endpoints dominating both.
            latency_ns=700,
            duplex=True,
            raw_gbps=64.0,
            source="AMD Instinct MI300X data sheet and CDNA 3 white paper (64 GB/s per link); ROCm/rccl#1210",
        ),
    )
}


def link_names() -> list[str]:
    return sorted(_LINKS)


def get_link(name: str) -> LinkSpec:
    try:
        return _LINKS[name]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; known links: {', '.join(link_names())}") from None


def exact_gbps(bandwidth_gbps: float | Fraction) -> Fraction:
    """The bandwidth as the decimal it was written as, for exact ceilings."""
    if isinstance(bandwidth_gbps, Fraction):
        return bandwidth_gbps
    return Fraction(repr(float(bandwidth_gbps)))


def serialise_ns(nbytes: int, gbps: Fraction) -> int:
    """ceil(nbytes / gbps) in integer nanoseconds."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be non-negative, got {nbytes}")
    if gbps <= 0:
        raise ValueError(f"bandwidth must be positive, got {gbps}")
    return -(-nbytes * gbps.denominator // gbps.numerator)


def transfer_ns(spec: LinkSpec, nbytes: int) -> int:
    """Serialisation time of nbytes on one direction of spec: ceil(nbytes / bandwidth), in ns.

    Latency is not included: it belongs to the path (see topology).
    """
    return serialise_ns(nbytes, exact_gbps(spec.bandwidth_gbps))


@dataclass(slots=True, frozen=True)
class LinkDegradation:
    """One direction of a card-to-card path running below its model from emulated time ``from_ns`` on.

    A message that leaves at or after ``from_ns`` holds the port ``1 / bw_factor`` times as long
    (the bandwidth it sees is scaled by ``bw_factor``, read at its decimal value as written) and
    arrives ``added_latency_ns`` later: ``occ' = ceil(occ / bw_factor)``, ``lat' = lat + added``.
    """
    bw_factor: float = 1.0
    added_latency_ns: int = 0
    from_ns: int = 0

    def __post_init__(self):
        if isinstance(self.bw_factor, bool) or not isinstance(self.bw_factor, (int, float)) \
                or not 0 < self.bw_factor <= 1:
            raise ValueError(f"link degradation: bw_factor must be in (0, 1], got {self.bw_factor!r}")
        for f in ("added_latency_ns", "from_ns"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"link degradation: {f} must be an int >= 0, got {v!r}")

    def apply(self, start: int, occ: int, lat: int) -> tuple[int, int]:
        """(occupancy, latency) of a message leaving at ``start`` with the model's ``occ`` and ``lat``."""
        if start < self.from_ns:
            return occ, lat
        f = exact_gbps(self.bw_factor)
        return -(-occ * f.denominator // f.numerator), lat + self.added_latency_ns

    def to_dict(self) -> dict:
        return {"bw_factor": self.bw_factor, "added_latency_ns": self.added_latency_ns, "from_ns": self.from_ns}
