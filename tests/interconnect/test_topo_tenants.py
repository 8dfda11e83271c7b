"""Instances stepped together share the fabric: a step's flows meet the same step of every other tenant."""
import pytest

from interconnect import topo_tenants
from interconnect.topology import get_topology

MiB = 1 << 20


def test_two_groups_under_one_uplink_halve_each_other():
    tree = get_topology("switch-tree", 8)  # leaves {0..3}, {4..7}; 4 hops of 350 ns across them
    ring = [(0, 4), (4, 0)]  # a two-card ring over the leaves
    assert tree.transfer_time_ns(0, 4, 64 * MiB, ring) == 1400 + 1_210_260  # ceil(67108864 / 55.45)
    shared = tree.with_tenants([[0, 4], [1, 5]])  # the other instance's ring 1 <-> 5 runs meanwhile
    assert shared.transfer_time_ns(0, 4, 64 * MiB, ring) == 1400 + 2_420_519  # ceil(67108864 / 27.725)
    assert shared.transfer_time_ns(5, 1, 64 * MiB, [(1, 5), (5, 1)]) == 1400 + 2_420_519
    three = tree.with_tenants([[0, 4], [1, 5], [2, 6]])
    assert three.transfer_time_ns(0, 4, 64 * MiB, ring) == 1400 + 3_630_778  # ceil(67108864 * 3 / 55.45)
    assert three.flow_bandwidth(ring) == {(0, 4): 55.45 / 3, (4, 0): 55.45 / 3}


def test_groups_on_their_own_links_do_not_slow_each_other():
    tree = get_topology("switch-tree", 8).with_tenants([[0, 1], [4, 5]])  # each group on its own leaf
    assert tree.transfer_time_ns(0, 1, 64 * MiB, [(0, 1), (1, 0)]) == 700 + 1_210_260
    study = get_topology("2s-2rp-split-flat", None).with_tenants([range(8), range(8, 16)])  # a box each
    assert study.flow_bandwidth([(i, (i + 1) % 8) for i in range(8)]) == {(i, (i + 1) % 8): 51.84 for i in range(8)}


def test_two_groups_across_the_root_complex():
    topo = get_topology("1s-2rp-std-cascade", 16, tenants=[[0, 8], [4, 12]])
    # 0 -> 8 and the other instance's 4 -> 12 both cross rp0 -> cpu0 -> rp1: 14.11 GB/s halved;
    # 350 + 115 + 115 + 150 + 150 + 115 + 115 + 350 = 1460 ns; 705_500 B / 7.055 GB/s = 100_000 ns
    assert topo.transfer_time_ns(0, 8, 705_500, [(0, 8)]) == 1460 + 100_000
    assert get_topology("1s-2rp-std-cascade", 16).transfer_time_ns(0, 8, 705_500, [(0, 8)]) == 1460 + 50_000


def test_images_only_for_a_step_inside_one_tenant():
    tenants = topo_tenants.check([[0, 4], [1, 5], [2, 6, 7]], 8)
    assert topo_tenants.concurrent(tenants, ((0, 4), (4, 0))) == ((0, 4), (4, 0), (1, 5), (5, 1))
    assert topo_tenants.concurrent(tenants, ((0, 1),)) == ((0, 1),)  # across two instances: alone
    assert topo_tenants.concurrent(tenants, ((2, 7),)) == ((2, 7),)  # no other tenant of its size
    assert topo_tenants.concurrent((), ((0, 4),)) == ((0, 4),)


@pytest.mark.parametrize("tenants,message", [([[0, 1], [1, 2]], "card 1 is in tenants 0 and 1"),
                                             ([[0, 9]], "card 9 out of range"), ([[]], "tenant 0 has no cards")])
def test_bad_tenants_are_refused(tenants, message):
    with pytest.raises(ValueError, match=message):
        get_topology("switch", 8, tenants=tenants)
