"""Flows that run at once share every link by max-min fairness: figures by hand on small graphs."""
from interconnect.links import LinkSpec, get_link
from interconnect.topo_graph import CARD, SWITCH, GraphBuilder
from interconnect.topology import Topology, get_topology

MiB = 1 << 20


def slow_card() -> Topology:
    """Cards 0, 1 under sw0 and 2, 3 under sw1, both switches cabled to a top switch; card 1 on 10 GB/s."""
    gen4, cable = get_link("pcie-gen4-x16"), get_link("pcie-gen4-x16-cable")
    slow = LinkSpec(name="slow", bandwidth_gbps=10.0, latency_ns=350, duplex=True, raw_gbps=10.0, source="test")
    b = GraphBuilder("slow-card")
    for name in ("sw0", "sw1", "top"):
        b.node(name, SWITCH)
    for i in range(4):
        b.node(f"card{i}", CARD)
        b.edge(f"card{i}", f"sw{i // 2}", slow if i == 1 else gen4)
    b.edge("sw0", "top", cable)
    b.edge("sw1", "top", cable)
    return Topology(b.build(), "slow-card", gen4)


def test_shared_uplink_gives_what_a_slow_flow_leaves():
    topo = slow_card()
    flows = [(0, 2), (1, 3)]
    # sw0's uplink (27.73) is shared; 1 -> 3 is held at 10 by card1's own link, so 0 -> 2 gets
    # 27.73 - 10 = 17.73 (an equal split would give it 13.865)
    assert topo.flow_bandwidth(flows) == {(0, 2): 17.73, (1, 3): 10.0}
    # card hop 350 + two cable hops 115 + card hop 350 = 930 ns; 1_773_000 B / 17.73 GB/s = 100_000 ns
    assert topo.transfer_time_ns(0, 2, 1_773_000, flows) == 930 + 100_000


def test_root_complex_crossing_is_shared_per_root_port():
    topo = get_topology("1s-2rp-std-cascade", 16)
    # 0 -> 8 and 4 -> 12 both cross rp0 -> cpu0 -> rp1: 14.11 GB/s of forwarding, halved
    both = [(0, 8), (4, 12)]
    assert topo.flow_bandwidth(both) == {(0, 8): 7.055, (4, 12): 7.055}
    # 350 + 115 + 115 + 150 + 150 + 115 + 115 + 350 = 1460 ns; 705_500 B / 7.055 GB/s = 100_000 ns
    assert topo.transfer_time_ns(0, 8, 705_500, both) == 1460 + 100_000
    assert topo.transfer_time_ns(0, 8, 705_500) == 1460 + 50_000
    # the other direction has its own channels
    assert topo.flow_bandwidth([*both, (8, 0)])[(8, 0)] == 14.11


def test_flows_through_the_root_complex_leave_the_cable_to_one_that_turns():
    topo = get_topology("1s-2rp-split-cascade", 16)
    # all three leave box 0 on cable box0-sw0 (27.73); 1 -> 12 and 2 -> 13 also cross the root
    # complex (14.11 / 2 = 7.055 each) and freeze first; 0 -> 8 turns in sw0 and takes the rest
    # of the cable: 27.73 - 2 * 7.055 = 13.62 (an equal split of the cable: 9.243)
    rates = topo.flow_bandwidth([(0, 8), (1, 12), (2, 13)])
    assert rates == {(0, 8): 13.62, (1, 12): 7.055, (2, 13): 7.055}


def test_two_groups_on_one_uplink_get_half_each():
    tree = get_topology("switch-tree", 8)  # leaves {0..3}, {4..7}
    # group A: card 0 broadcasts to 4, 5, 6 one message at a time (its port serialises them: one
    # stream); group B: 1 -> 7. Leaf 0's uplink carries two streams: 55.45 / 2 each.
    rates = tree.flow_bandwidth([(0, 4), (0, 5), (0, 6), (1, 7)])
    assert rates == {(0, 4): 27.725, (0, 5): 27.725, (0, 6): 27.725, (1, 7): 27.725}
    # two rings over {0, 4} and {1, 5}: both directions of the uplink, two streams each way
    assert set(tree.flow_bandwidth([(0, 4), (4, 0), (1, 5), (5, 1)]).values()) == {27.725}


def test_one_sender_fanning_out_keeps_its_full_port():
    topo = get_topology("switch", 4)
    assert topo.flow_bandwidth([(0, 1), (0, 2), (0, 3)]) == dict.fromkeys([(0, 1), (0, 2), (0, 3)], 55.45)


def test_rates_do_not_depend_on_flow_order():
    topo = get_topology("2s-2rp-split-flat", 16)
    flows = [(i, (i + 5) % 16) for i in range(16)] + [(i, (i + 9) % 16) for i in range(16)]
    first = topo.flow_bandwidth(flows)
    assert get_topology("2s-2rp-split-flat", 16).flow_bandwidth(flows[::-1]) == first
    assert all(type(topo.transfer_time_ns(s, d, 3 * MiB + 7, flows)) is int for s, d in flows)
