"""The step walk over all ranks: jumping over repeating layers gives the integers of walking every segment."""
from __future__ import annotations

import random

import pytest

from devices import walk as walk_mod
from devices.walk import walk
from interconnect import sim
from interconnect.emulation import memory_reduce_ns
from interconnect.topology import get_topology

REDUCE = memory_reduce_ns(256e9, 0.8)  # atom-plus figures


def _stream(rng: random.Random, n: int, layers: int, skew: bool):
    """Costs and calls of a decoder stream: a first segment, two per layer, a last one (no collective)."""
    attn, mlp = rng.randrange(1_000, 500_000), rng.randrange(1_000, 500_000)
    first, last = rng.randrange(1_000, 900_000), rng.randrange(1_000, 900_000)
    per_rank = [[first + (rng.randrange(3_000) if skew else 0)] for _ in range(n)]
    for r in range(n):
        extra = rng.randrange(2_000) if skew else 0  # a rank whose ops cost a little more, every layer
        per_rank[r] += [mlp + extra, attn + extra] * layers
        per_rank[r][-1] = last  # the last layer's second segment ends in the logits' all_gather
        per_rank[r].append(rng.randrange(100))
    size = rng.choice([4096, 65536, 1 << 20])
    calls = [sim.Call("all_reduce", size, "uint8", "auto")] * (2 * layers) + [
        sim.Call("all_gather", size // 4, "uint8", "auto")]
    return per_rank, calls


def _every_segment(*args):
    """The same walk with jumps off: one simulated collective per segment."""
    saved = walk_mod.MAX_PERIOD
    walk_mod.MAX_PERIOD = 0
    try:
        return walk(*args)
    finally:
        walk_mod.MAX_PERIOD = saved


@pytest.mark.parametrize("n,topology", [(2, "switch"), (4, "switch"), (8, "switch"), (8, "switch-tree")])
@pytest.mark.parametrize("skew", [False, True])
def test_jumps_give_the_integers_of_walking_every_segment(n, topology, skew):
    rng = random.Random(f"{n}{topology}{skew}")
    topo = get_topology(topology, n)
    jumped = 0
    for _ in range(4):
        costs, calls = _stream(rng, n, rng.choice([4, 32]), skew)
        clocks = [rng.randrange(10**9, 10**9 + 50_000) for _ in range(n)]
        ports = [(c - rng.randrange(-20_000, 90_000), c - rng.randrange(-20_000, 90_000)) for c in clocks]
        args = (costs, calls, list(range(n)), topo, REDUCE, clocks, ports)
        before = sim.CACHE.hits + sim.CACHE.misses
        got = walk(*args)
        simulated = sim.CACHE.hits + sim.CACHE.misses - before
        assert got == _every_segment(*args)
        jumped += simulated < len(calls)
    assert jumped  # the jumps were taken, not only allowed


def test_walking_every_segment_is_running_each_collective_from_the_states_it_finds():
    topo = get_topology("switch", 4)
    costs = [[100, 5_000, 7_000, 9], [300, 5_000, 7_000, 9], [200, 5_100, 7_000, 9], [100, 5_000, 6_000, 9]]
    calls = [sim.Call("all_reduce", 65536, "uint8", "auto"), sim.Call("all_reduce", 1 << 20, "uint8", "ring"),
             [sim.Call("all_gather", 1024 * (r + 1), "uint8", "auto") for r in range(4)]]  # sized per rank
    clocks, ports = [10, 0, 50, 0], [(0, 0)] * 4
    got = walk(costs, calls, [0, 1, 2, 3], topo, REDUCE, clocks, ports)
    states = [(c, tx, rx) for c, (tx, rx) in zip(clocks, ports)]
    for i, call in enumerate(calls):
        states = [(c + costs[r][i], tx, rx) for r, (c, tx, rx) in enumerate(states)]
        per_rank = call if isinstance(call, list) else [call] * 4
        outs = [sim.simulate(per_rank[r], [0, 1, 2, 3], topo, REDUCE, states)[r] for r in range(4)]
        states = [(c, old[1] if tx is None else tx, old[2] if rx is None else rx)
                  for (c, tx, rx), old in zip(outs, states)]
    states = [(c + costs[r][3], tx, rx) for r, (c, tx, rx) in enumerate(states)]
    assert got == ([c for c, _, _ in states], [(tx, rx) for _, tx, rx in states])


@pytest.mark.parametrize("n,topology", [(2, "switch"), (4, "switch-tree")])
def test_an_unchunked_task_walk_is_the_segment_walk(n, topology):
    """One chunk: each task after the one before it, so the two-engine walk gives the segment walk's integers."""
    from devices.schedule import COMPUTE, build_tasks
    from devices.walk import fold, walk_tasks

    rng = random.Random(f"tasks{n}{topology}")
    layer = [{"op": "linear"}, {"op": "all_reduce"}, {"op": "attention"}, {"op": "all_reduce"}]
    ops = [{"op": "embed"}, *layer * 6, {"op": "rmsnorm", "w": "norm"}, {"op": "linear"}, {"op": "all_gather"}]
    tasks = build_tasks(ops, 1)
    num_compute = sum(t.engine == COMPUTE for t in tasks)
    costs = [[rng.randrange(1_000, 300_000) for _ in range(num_compute)] for _ in range(n)]
    calls = [sim.Call(ops[t.ops[0]]["op"], rng.choice([4096, 1 << 20]), "uint8", "auto")
             for t in tasks if t.engine != COMPUTE]
    clocks = [rng.randrange(10**9, 10**9 + 50_000) for _ in range(n)]
    ports = [(c - rng.randrange(90_000), c - rng.randrange(90_000)) for c in clocks]
    topo = get_topology(topology, n)
    seen = []
    got = walk_tasks(tasks, costs, calls, list(range(n)), topo, REDUCE, clocks, ports,
                     on_task=lambda i, starts, ends, call: seen.append(i))
    assert got == walk([fold(tasks, c) for c in costs], calls, list(range(n)), topo, REDUCE, clocks, ports)
    assert seen == list(range(len(tasks)))
