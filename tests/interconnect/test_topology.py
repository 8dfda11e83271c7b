import pytest

from interconnect.links import LinkSpec, get_link, transfer_ns
from interconnect.topology import DOWN, UP, LinkId, get_topology, topology_names

MiB = 1 << 20
PCIE = get_link("pcie-gen5-x16")
L = PCIE.latency_ns  # 350
HALF_DUPLEX = LinkSpec(
    name="half", bandwidth_gbps=40.0, latency_ns=100, duplex=False, raw_gbps=50.0, source="test"
)


def test_unknown_topology_lists_known_names():
    with pytest.raises(ValueError, match="unknown topology 'torus'") as err:
        get_topology("torus", 4)
    for name in ("switch", "host-staged", "switch-tree", "multi-node"):
        assert name in str(err.value)
    assert topology_names()[0] == "switch"


def test_unknown_link_name_is_rejected():
    with pytest.raises(ValueError, match="unknown link"):
        get_topology("switch", 4, link="pcie-gen9")


@pytest.mark.parametrize("name", ["switch", "host-staged", "switch-tree", "multi-node"])
def test_bad_card_pairs(name):
    topo = get_topology(name, 8)
    for src, dst in [(0, 0), (0, 8), (-1, 2)]:
        with pytest.raises(ValueError):
            topo.path(src, dst)
    with pytest.raises(ValueError):
        get_topology(name, 0)


def test_switch_path_and_time():
    topo = get_topology("switch", 8)
    path = topo.path(2, 5)
    assert [h.link for h in path] == [LinkId("card2", UP), LinkId("card5", DOWN)]
    assert topo.latency_ns(2, 5) == 2 * L == 700
    assert topo.bottleneck_gbps(2, 5) == 55.45
    # 700 + ceil(67108864 / 55.45)
    assert topo.transfer_time_ns(2, 5, 64 * MiB) == 700 + 1_210_260


def test_host_staged_exact_formula():
    switch, host = get_topology("switch", 4), get_topology("host-staged", 4)
    assert len(host.path(0, 1)) == 2
    assert len(host.stages(0, 1)) == 2
    assert host.latency_ns(0, 1) == 2 * (L + 500)
    for n in (0, 1, 4096, 64 * MiB, 10**9):
        t_switch = switch.transfer_time_ns(0, 1, n)
        t_host = host.transfer_time_ns(0, 1, n)
        assert t_host == 2 * (L + 500) + 2 * transfer_ns(PCIE, n)
        assert t_host == 2 * t_switch + 2 * (500 - L)
    assert host.transfer_time_ns(0, 1, 64 * MiB) == 2_422_220
    assert host.transfer_time_ns(0, 1, 1 << 30) / switch.transfer_time_ns(0, 1, 1 << 30) == pytest.approx(2, abs=1e-4)


def test_host_latency_is_configurable():
    host = get_topology("host-staged", 4, host_latency_ns=0)
    t_switch = get_topology("switch", 4).transfer_time_ns(0, 3, 64 * MiB)
    assert host.transfer_time_ns(0, 3, 64 * MiB) == 2 * t_switch - 2 * L
    with pytest.raises(ValueError):
        get_topology("host-staged", 4, host_latency_ns=-1)


def test_switch_tree_paths():
    tree = get_topology("switch-tree", 8)  # leaves {0..3}, {4..7}
    assert len(tree.path(0, 3)) == 2
    assert [h.link for h in tree.path(1, 6)] == [
        LinkId("card1", UP), LinkId("leaf0", UP), LinkId("leaf1", DOWN), LinkId("card6", DOWN)
    ]
    assert tree.latency_ns(0, 3) == 2 * L
    assert tree.latency_ns(1, 6) == 4 * L == 1400


def test_switch_tree_leaf_size_and_partial_leaf():
    tree = get_topology("switch-tree", 6, cards_per_leaf=2)
    assert tree.num_groups == 3
    assert len(tree.path(0, 1)) == 2
    assert len(tree.path(1, 2)) == 4
    assert get_topology("switch-tree", 6).num_groups == 2
    with pytest.raises(ValueError):
        get_topology("switch-tree", 8, cards_per_leaf=0)


def test_shared_leaf_uplink_halves_cross_leaf_flows_only():
    tree = get_topology("switch-tree", 8)
    cross = tree.flow_bandwidth([(0, 4), (1, 5)])
    assert cross == {(0, 4): 55.45 / 2, (1, 5): 55.45 / 2}
    intra = tree.flow_bandwidth([(0, 1), (2, 3)])
    assert intra == {(0, 1): 55.45, (2, 3): 55.45}
    mixed = tree.flow_bandwidth([(0, 4), (1, 5), (2, 3)])
    assert mixed[(2, 3)] == 55.45 and mixed[(0, 4)] == 55.45 / 2
    # on a flat switch the same pairs do not contend
    assert get_topology("switch", 8).flow_bandwidth([(0, 4), (1, 5)]) == {(0, 4): 55.45, (1, 5): 55.45}


def test_contended_transfer_time():
    tree = get_topology("switch-tree", 8)
    alone = tree.transfer_time_ns(0, 4, 64 * MiB)
    shared = tree.transfer_time_ns(0, 4, 64 * MiB, concurrent_flows=[(0, 4), (1, 5)])
    assert alone == 1400 + 1_210_260
    assert shared == 1400 + 2_420_519  # ceil(67108864 / 27.725)
    # the flow itself is counted once whether listed or not
    assert tree.transfer_time_ns(0, 4, 64 * MiB, concurrent_flows=[(1, 5)]) == shared
    assert tree.transfer_time_ns(0, 4, 64 * MiB, concurrent_flows=[(2, 3)]) == alone


def test_four_flows_share_one_uplink_in_quarters():
    tree = get_topology("switch-tree", 8)
    flows = [(i, i + 4) for i in range(4)]
    assert set(tree.flow_bandwidth(flows).values()) == {55.45 / 4}


def test_duplex_opposite_directions_do_not_contend():
    tree = get_topology("switch-tree", 8)
    assert tree.flow_bandwidth([(0, 4), (4, 0)]) == {(0, 4): 55.45, (4, 0): 55.45}


def test_half_duplex_directions_share():
    tree = get_topology("switch-tree", 8, uplink=HALF_DUPLEX)
    assert tree.bottleneck_gbps(0, 4) == 40.0
    assert tree.flow_bandwidth([(0, 4), (4, 0)]) == {(0, 4): 20.0, (4, 0): 20.0}
    ring = get_topology("switch", 4, link=HALF_DUPLEX)
    # card 1 receives from 0 and sends to 2 on the same half-duplex port
    assert ring.flow_bandwidth([(0, 1), (1, 2)]) == {(0, 1): 20.0, (1, 2): 20.0}
    assert get_topology("switch", 4).flow_bandwidth([(0, 1), (1, 2)]) == {(0, 1): 55.45, (1, 2): 55.45}


def test_multi_node():
    topo = get_topology("multi-node", 16)  # 8 cards per node
    assert len(topo.path(0, 7)) == 2
    assert [h.link for h in topo.path(0, 8)][1:3] == [LinkId("node0-nic", UP), LinkId("node1-nic", DOWN)]
    assert topo.latency_ns(0, 7) == 700
    assert topo.latency_ns(0, 8) == 2 * L + 2 * 600 == 1900
    assert topo.bottleneck_gbps(0, 8) == 49.0
    flows = [(i, i + 8) for i in range(4)]
    assert set(topo.flow_bandwidth(flows).values()) == {49.0 / 4}
    assert topo.transfer_time_ns(0, 8, 49_000) == 1900 + 1000
    assert topo.transfer_time_ns(0, 8, 49_000, concurrent_flows=flows) == 1900 + 4000


def test_multi_node_options():
    topo = get_topology("multi-node", 8, cards_per_node=2, network="roce-100g")
    assert topo.num_groups == 4
    assert topo.bottleneck_gbps(0, 2) == 12.0
    assert topo.latency_ns(0, 2) == 2 * L + 2 * 900


@pytest.mark.parametrize("name", ["switch", "host-staged", "switch-tree", "multi-node"])
def test_integer_and_deterministic(name):
    flows = [(i, (i + 5) % 16) for i in range(16)]

    def run():
        topo = get_topology(name, 16)
        times = [topo.transfer_time_ns(s, d, 3 * MiB + 7, concurrent_flows=flows) for s, d in flows]
        lats = [topo.latency_ns(s, d) for s, d in flows]
        return times, lats, topo.flow_bandwidth(flows)

    first = run()
    assert all(type(t) is int for t in first[0] + first[1])
    assert run() == first


def test_gen4_link_doubles_bandwidth_term():
    gen4 = get_topology("switch", 2, link="pcie-gen4-x16")
    assert gen4.transfer_time_ns(0, 1, 64 * MiB) == 700 + 2_420_082


@pytest.mark.parametrize("name, src, dst, nodes, label", [
    ("switch", 2, 5, ["card2", "sw0", "card5"], "PIX"),
    ("host-staged", 0, 1, ["card0", "cpu0", "card1"], "PHB"),
    ("switch-tree", 0, 3, ["card0", "leaf0", "card3"], "PIX"),
    ("switch-tree", 1, 6, ["card1", "leaf0", "root", "leaf1", "card6"], "PXB"),
    ("multi-node", 0, 8, ["card0", "node0", "net", "node1", "card8"], "NET"),
])
def test_routes_of_the_original_presets(name, src, dst, nodes, label):
    topo = get_topology(name, 16)
    assert topo.route(src, dst) == nodes
    assert topo.route(dst, src) == nodes[::-1]
    assert topo.relation(src, dst) == label
    assert topo.relation(src, src) == "X"


def test_repr_and_card_count():
    assert repr(get_topology("switch", 4)) == "Topology('switch', num_cards=4, link='pcie-gen5-x16')"
    assert repr(get_topology("switch", 2, link="pcie-gen4-x16")).endswith("link='pcie-gen4-x16')")
    with pytest.raises(ValueError, match="needs a number of cards"):
        get_topology("switch-tree", None)
