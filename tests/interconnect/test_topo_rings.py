"""Multi-channel rings (given, default, searched) and the double binary tree: exact on real cards,
searched rings never slower than the default, and a one-path ring at the link model's bandwidth."""
from __future__ import annotations

from pathlib import Path

import pytest

from interconnect import dbtree, ring_search, sim
from interconnect.emulation import memory_reduce_ns
from interconnect.ring import DEFAULT, RingSet
from interconnect.topology import get_topology, topology_names
from rsd_runtime import CardError, Cluster

from test_collectives import check, make_inputs, reference

TWO_BOXES = str(Path(__file__).parent / "data" / "two-boxes-split.toml")
REDUCE = memory_reduce_ns(5.3e12, 0.8)  # gpu-mi300x figures
STUDY = ["1s-1rp-std-cascade", "1s-2rp-std-cascade", "1s-2rp-split-cascade", "2s-2rp-std-flat",
         "2s-2rp-split-flat"]
KINDS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce"]


@pytest.fixture(scope="module")
def boxes(shm_prefix):
    with Cluster(num_devices=8, topology=TWO_BOXES, shm_prefix=shm_prefix) as c:
        yield c


def run_case(cluster, kind, algo, group, dtype, count, op="sum", root=0, seed=0):
    n = len(group)
    ins = make_inputs(n, count * n if kind == "reduce_scatter" else count, dtype, seed)
    res = cluster.collective(kind, ins, group=group, algo=algo, op=op, root=root)
    for out, want in zip(res["outputs"], reference(kind, op, ins, root)):
        check(out, want, dtype, kind, op, n)
    return res


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo", ["ring:search", "ring:0 1 2 3 4 5 6 7|7 5 3 1 6 4 2 0|2 6 0 4 1 5 3 7"])
def test_multi_channel_rings_are_exact_on_real_cards(boxes, kind, algo):
    assert ring_search.search(get_topology(TWO_BOXES, None), tuple(range(8))) != DEFAULT
    root = 5 if kind in ("broadcast", "reduce") else 0
    for dtype in ("int32", "float32", "bfloat16"):
        for count in (1, 7, 1000, 300_000):  # fewer elements than channels x ranks, and many
            run_case(boxes, kind, algo, list(range(8)), dtype, count, root=root)
    run_case(boxes, kind, algo, list(range(8)), "int64", 37, "max", root)


@pytest.mark.parametrize("group", [[0, 1], [6, 1, 4], list(range(8)), [7, 0, 3, 2, 5]])
def test_double_binary_tree_all_reduce_is_exact_on_real_cards(boxes, group):
    for dtype in ("int32", "float32", "bfloat16"):
        for count in (1, 3, 1001, 600_000):  # 600k float32: several pipelined pieces per tree
            res = run_case(boxes, "all_reduce", "dbtree", group, dtype, count)
            assert all((o == res["outputs"][0]).all() for o in res["outputs"])  # identical bits
    run_case(boxes, "all_reduce", "dbtree", group, "float32", 77, "avg")


def test_bad_ring_names_are_refused(boxes):
    with pytest.raises(CardError, match="not an order of the 4 group ranks"):
        boxes.collective("all_reduce", make_inputs(4, 8, "int32", 0), group=[0, 1, 2, 3], algo="ring:0 1 2")
    with pytest.raises(CardError, match="expected group ranks separated by spaces"):
        boxes.collective("all_reduce", make_inputs(2, 8, "int32", 0), group=[0, 1], algo="ring:0 x")
    with pytest.raises(CardError, match="algorithm 'dbtree' has no all_gather"):
        boxes.collective("all_gather", make_inputs(2, 8, "int32", 0), group=[0, 1], algo="dbtree")
    assert boxes.status()[0]["state"] == "idle"


@pytest.mark.parametrize("n", range(2, 41))
def test_every_rank_is_a_leaf_in_one_of_the_two_trees(n):
    trees = dbtree.trees(n)
    for parents in trees:
        assert sum(p is None for p in parents) == 1
        for r in range(n):  # every rank reaches the root
            hops = 0
            while parents[r] is not None:
                r, hops = parents[r], hops + 1
                assert hops < n
        assert max(len(dbtree.children(parents, r)) for r in range(n)) <= 2
    leaves = [{r for r in range(n) if not dbtree.children(t, r)} for t in trees]
    assert leaves[0] | leaves[1] == set(range(n)) and not leaves[0] & leaves[1]


def emulated_ns(topo, kind: str, algo: str, nbytes: int, cards: list[int]) -> int:
    n = len(cards)
    count = nbytes // 4 // (n if kind == "all_gather" else 1)
    count -= count % n
    out = sim.simulate(sim.Call(kind, count, "float32", algo), cards, topo, REDUCE, [(0, 0, 0)] * n)
    return max(c for c, _, _ in out)


PRESET_CASES = [(name, None) for name in STUDY] + [("switch", 8), ("switch-tree", 8), ("host-staged", 4),
                                                   ("multi-node", 8)]


@pytest.mark.parametrize("name,n", PRESET_CASES)
def test_searched_rings_are_never_slower_than_the_default(name, n):
    topo = get_topology(name, n)
    cards = list(range(topo.num_cards))
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "broadcast"):
        default = emulated_ns(topo, kind, "ring", 64 << 20, cards)
        searched = emulated_ns(topo, kind, "ring:search", 64 << 20, cards)
        assert searched <= default, (kind, searched, default)
    assert set(topology_names()) >= {name for name, _ in PRESET_CASES}


def test_searched_rings_beat_the_default_where_the_boxes_hang_off_different_switches():
    topo = get_topology("2s-2rp-split-flat", None)
    cards = list(range(16))
    rings = ring_search.search(topo, tuple(cards))
    assert len(rings.channels(16)) > 1
    default = emulated_ns(topo, "all_gather", "ring", 256 << 20, cards)
    assert emulated_ns(topo, "all_gather", "ring:search", 256 << 20, cards) < default / 2
    # the search's rings, given by hand, are the same rings
    explicit = "ring:" + "|".join(" ".join(map(str, o)) for o in rings.orders)
    assert emulated_ns(topo, "all_gather", explicit, 256 << 20, cards) == \
        emulated_ns(topo, "all_gather", "ring:search", 256 << 20, cards)


@pytest.mark.parametrize("name,n,link", [("switch", 4, "pcie-gen5-x16"), ("switch", 8, "pcie-gen4-x16")])
def test_a_one_path_ring_runs_at_the_link_model_bandwidth(name, n, link):
    topo = get_topology(name, n, link)
    nbytes = 1 << 30
    t = emulated_ns(topo, "all_gather", "ring", nbytes, list(range(n)))
    busbw = nbytes / t * (n - 1) / n  # GB/s
    ring = [(i, (i + 1) % n) for i in range(n)]
    model = min(topo.flow_bandwidth(ring).values())
    assert model == topo.link.bandwidth_gbps
    assert abs(busbw - model) / model < 0.01, (busbw, model)


def test_auto_takes_searched_rings_only_where_they_are_faster():
    from interconnect import auto
    study = get_topology("2s-2rp-split-flat", None)
    assert auto.choose("all_reduce", 256 << 20, list(range(16)), study) == "ring:search"
    assert auto.choose("all_reduce", 256 << 20, list(range(8)), study) == "ring"  # one box: one island
    assert auto.choose("all_reduce", 256 << 20, list(range(8)), get_topology("switch-tree", 8)) == "ring"


def test_explicit_orders_parse():
    assert ring_search.parse("default") is DEFAULT
    assert ring_search.parse(" 0 1 2 | 2 1 0", 3) == RingSet(((0, 1, 2), (2, 1, 0)))
    with pytest.raises(ValueError, match="ring order 0 0 1 is not an order of the 3 group ranks"):
        ring_search.parse("0 0 1", 3)


def test_the_double_binary_tree_keeps_its_ports_busy():
    """4 cards on one switch, 64 MiB: a rank inner in one tree receives two children's halves and its
    parent's result there (1.5 S) and its parent's result in the other (0.5 S), and sends as much:
    2 S through each port, so 2 S / B is the floor. Its pieces pipeline to within 1.5 x of it."""
    topo = get_topology("switch", 4)
    nbytes = 64 << 20
    floor = 2 * nbytes / topo.link.bandwidth_gbps  # ns
    t = emulated_ns(topo, "all_reduce", "dbtree", nbytes, [0, 1, 2, 3])
    assert floor <= t <= 1.5 * floor, (t, floor)
