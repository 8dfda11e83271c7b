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
