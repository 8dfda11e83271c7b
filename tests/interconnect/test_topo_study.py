"""The PCIe-fabric study presets: two MI300X-class boxes of 8 cards on PCIe Gen4 switches."""
import pytest

from devices.spec import get_spec
from interconnect.links import get_link
from interconnect.topology import get_topology

STUDY = ["1s-1rp-std-cascade", "1s-2rp-std-cascade", "1s-2rp-split-cascade", "2s-2rp-std-flat",
         "2s-2rp-split-flat"]

# card 0 (box 0, first partition) to a card of box 1, by preset: the nodes crossed
ROUTES = {
    "1s-1rp-std-cascade": {
        8: ["card0", "box0-sw0", "sw0", "box1-sw0", "card8"],
        12: ["card0", "box0-sw0", "sw0", "box1-sw1", "card12"],
    },
    "1s-2rp-std-cascade": {
        8: ["card0", "box0-sw0", "sw0", "rp0", "cpu0", "rp1", "sw1", "box1-sw0", "card8"],
        12: ["card0", "box0-sw0", "sw0", "rp0", "cpu0", "rp1", "sw1", "box1-sw1", "card12"],
    },
    "1s-2rp-split-cascade": {
        8: ["card0", "box0-sw0", "sw0", "box1-sw0", "card8"],
        12: ["card0", "box0-sw0", "sw0", "rp0", "cpu0", "rp1", "sw1", "box1-sw1", "card12"],
    },
    "2s-2rp-std-flat": {
        8: ["card0", "box0-sw0", "sw0", "rp0", "cpu0", "cpu1", "rp2", "sw2", "box1-sw0", "card8"],
        14: ["card0", "box0-sw0", "sw0", "rp0", "cpu0", "cpu1", "rp3", "sw3", "box1-sw3", "card14"],
    },
    "2s-2rp-split-flat": {
        8: ["card0", "box0-sw0", "sw0", "box1-sw0", "card8"],
        10: ["card0", "box0-sw0", "sw0", "rp0", "cpu0", "rp1", "sw1", "box1-sw1", "card10"],
        12: ["card0", "box0-sw0", "sw0", "rp0", "cpu0", "cpu1", "rp2", "sw2", "box1-sw2", "card12"],
    },
}
LABELS = {  # card 0 to cards 8..15
    "1s-1rp-std-cascade": ["PXB"] * 8,
    "1s-2rp-std-cascade": ["PHB"] * 8,
    "1s-2rp-split-cascade": ["PXB"] * 4 + ["PHB"] * 4,
    "2s-2rp-std-flat": ["SYS"] * 8,
    "2s-2rp-split-flat": ["PXB"] * 2 + ["PHB"] * 2 + ["SYS"] * 4,
}


@pytest.mark.parametrize("name", STUDY)
def test_routes_and_labels(name):
    topo = get_topology(name, 16)
    assert topo.link.name == "pcie-gen4-x16"
    for dst, nodes in ROUTES[name].items():
        assert topo.route(0, dst) == nodes
        assert topo.route(dst, 0) == nodes[::-1]
    # inside a box every pair has its own Infinity Fabric link; cards number box by box
    assert all(topo.route(a, b) == [f"card{a}", f"card{b}"] for a in range(8) for b in range(8) if a != b)
    assert topo.route(9, 15) == ["card9", "card15"]
    assert [topo.relation(0, d) for d in range(8, 16)] == LABELS[name]
    assert {topo.relation(0, d) for d in range(1, 8)} == {"XGMI"}


def test_fixed_size():
    assert get_topology("2s-2rp-split-flat", None).num_cards == 16
    with pytest.raises(ValueError, match="has 16 cards, not 8"):
        get_topology("2s-2rp-split-flat", 8)


@pytest.mark.parametrize("name", STUDY)
def test_host_switches_have_six_ports(name):
    g = get_topology(name, 16).graph
    for sw in (n for n in g if n.startswith("sw")):
        assert len(g[sw]) <= 6  # one upstream, at most five cables down


def test_figures_across_the_box_boundary():
    cable, rc = get_link("pcie-gen4-x16-cable"), get_link("root-complex-gen4")
    card, xgmi, fabric = get_link("pcie-gen4-x16"), get_link("xgmi-epyc-x4"), get_link("infinity-fabric-mi300x")
    turn = get_topology("1s-1rp-std-cascade", 16)
    # card -> partition -> host switch -> partition -> card: 2 card hops, 2 cable hops
    assert turn.latency_ns(0, 8) == 2 * card.latency_ns + 2 * cable.latency_ns == 930
    assert turn.bottleneck_gbps(0, 8) == 27.73
    phb = get_topology("1s-2rp-std-cascade", 16)
    assert phb.latency_ns(0, 8) == 930 + 2 * cable.latency_ns + 2 * rc.latency_ns == 1460
    assert phb.bottleneck_gbps(0, 8) == 14.11
    sys_ = get_topology("2s-2rp-std-flat", 16)
    assert sys_.latency_ns(0, 8) == 1460 + xgmi.latency_ns == 1540
    assert sys_.latency_ns(0, 1) == fabric.latency_ns == 700
    assert sys_.bottleneck_gbps(0, 1) == 51.84


def test_a_rail_aligned_ring_step_turns_in_the_switches():
    # every card sends to its twin in the other box at once: in split-flat each pair turns in its own
    # host switch, two flows per cable direction (27.73 / 2); in std-flat all eight cross the root
    # complex of each socket, four per root port (14.11 / 4)
    flows = [(i, i + 8) for i in range(8)] + [(i + 8, i) for i in range(8)]
    split = get_topology("2s-2rp-split-flat", 16).flow_bandwidth(flows)
    std = get_topology("2s-2rp-std-flat", 16).flow_bandwidth(flows)
    assert set(split.values()) == {13.865}
    assert set(std.values()) == {3.5275}


def test_mi300x_device_preset():
    spec = get_spec("gpu-mi300x")
    assert spec.peak_ops["bfloat16"] == spec.peak_ops["float16"] == 1307.4e12
    assert spec.peak_ops["int8"] == 2614.9e12 and spec.peak_ops["float32"] == 163.4e12
    assert spec.memory_bytes == 192 << 30 and spec.memory_bw == 5.3e12
    assert spec.sram_bytes == 256 << 20 and spec.tdp_watts == 750.0
