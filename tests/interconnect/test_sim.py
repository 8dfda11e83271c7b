"""The in-process simulation of collectives: the cards' emulated figures without their messages."""
from __future__ import annotations

import random

import pytest

from conftest import assert_no_leaks
from rsd_runtime.cluster import Cluster

from interconnect import sim
from interconnect.emulation import memory_reduce_ns
from interconnect.topology import get_topology

REDUCE = memory_reduce_ns(256e9, 0.8)  # atom-plus figures
KINDS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce"]


def test_one_mib_ring_all_reduce_matches_the_hand_figure():
    # the same 44,088 ns the cards give (tests/interconnect/test_emulated_clock.py)
    topo = get_topology("switch", 4)
    out = sim.simulate(sim.Call("all_reduce", (1 << 20) // 4, "float32", "ring"), [0, 1, 2, 3], topo, REDUCE,
                       [(0, 0, 0)] * 4)
    assert max(c for c, _, _ in out) == 44_088


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo", ["ring", "tree", "one-shot", "auto"])
def test_cached_results_equal_fresh_simulations_from_skewed_states(kind, algo):
    rng = random.Random(f"{kind}{algo}")
    topo = get_topology("switch-tree", 6, cards_per_leaf=3)
    cache = sim.SimCache()
    call = sim.Call(kind, 6 * 1000, "bfloat16", algo, "sum", 2)
    for _ in range(6):
        base = rng.randrange(10**9)
        states = [(base + rng.randrange(5000), base + rng.randrange(-4000, 9000), base + rng.randrange(-9000, 9000))
                  for _ in range(6)]
        fresh = sim.simulate(call, list(range(6)), topo, REDUCE, states)
        for _ in range(2):  # a miss, then a hit
            cached = cache.run(call, list(range(6)), topo, REDUCE, states)
            assert cached == fresh
    assert cache.hits == 6 and cache.misses == 6


def test_a_call_that_cannot_complete_is_reported():
    topo = get_topology("switch", 2)

    world = sim._World()
    ports = [sim.PortClock(topo, c, REDUCE) for c in range(2)]
    fabrics = [sim.SimFabric(world, c, sim._Clock(0), ports[c]) for c in range(2)]
    with pytest.raises(sim.SimDeadlock):
        world.run([lambda: fabrics[0].recv(1, (0,)), lambda: fabrics[1].recv(0, (0,))])


@pytest.fixture(scope="module")
def clusters(shm_prefix):
    with Cluster(num_devices=4, shm_prefix=shm_prefix, topology="switch-tree",
                 topology_options={"cards_per_leaf": 2}) as real, \
         Cluster(num_devices=4, shm_prefix=shm_prefix, topology="switch-tree", phantom=True,
                 topology_options={"cards_per_leaf": 2}) as phantom:
        yield real, phantom
    assert_no_leaks()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo", ["ring", "tree", "one-shot"])
def test_phantom_cards_simulating_each_call_give_the_real_cards_figures(clusters, kind, algo):
    real, phantom = clusters
    for count in (4 * 3, 4 * 300_000):  # a latency-bound and a bandwidth-bound size, window and socket paths
        a = real.bench_collective(kind, count, "float32", algo=algo, root=1, warmup=1, iters=1)
        b = phantom.bench_collective(kind, count, "float32", algo=algo, root=1, warmup=1, iters=1)
        assert a["wrong"] == 0 and b["emu_ns"] == a["emu_ns"], (count, a, b)


@pytest.mark.parametrize("kind,algo", [("all_reduce", "dbtree"), ("all_gather", "ring:0 1 2 3|3 2 1 0"),
                                       ("reduce_scatter", "ring:0 2 1 3|3 1 2 0")])
def test_phantom_double_trees_and_multi_channel_rings_give_the_real_cards_figures(clusters, kind, algo):
    real, phantom = clusters
    for count in (4 * 3, 4 * 300_000):
        a = real.bench_collective(kind, count, "float32", algo=algo, warmup=1, iters=1)
        b = phantom.bench_collective(kind, count, "float32", algo=algo, warmup=1, iters=1)
        assert a["wrong"] == 0 and b["emu_ns"] == a["emu_ns"], (count, a, b)


@pytest.mark.parametrize("topology,options", [("switch", {}), ("switch-tree", {"cards_per_leaf": 3}),
                                              ("host-staged", {})])
def test_one_shot_shortcut_equals_running_the_algorithms_messages(topology, options):
    """The one-shot all_reduce and all_gather are simulated from their port operations alone: the same
    figures as running ``interconnect.oneshot`` over mailboxes, from skewed entry states."""
    rng = random.Random(topology)
    topo = get_topology(topology, 6, **options)
    shortcuts = 0
    for kind in ("all_reduce", "all_gather"):
        for count, dtype in ((1, "float32"), (3, "bfloat16"), (1000, "float32"), (8192, "bfloat16"), (10**5, "float32")):
            for n in (2, 3, 4, 6):
                cards = rng.sample(range(6), n)  # any group order
                base = rng.randrange(10**9)
                states = [(base + rng.randrange(5000), base + rng.randrange(-4000, 9000),
                           base + rng.randrange(-9000, 9000)) for _ in range(n)]
                for algo in ("one-shot", "auto"):
                    call = sim.Call(kind, count, dtype, algo)
                    assert sim.simulate(call, cards, topo, REDUCE, states) == \
                        sim.simulate_messages(call, cards, topo, REDUCE, states), (kind, count, n, algo)
                    shortcuts += sim._algo_name(call, cards, topo) == "one-shot"
    assert shortcuts >= 40  # most of these calls took the shortcut
