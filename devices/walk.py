"""A step's emulated clocks for every rank at once, from their entry states and segment costs.

A stream is cut into segments (``devices.phantom.segments``): compute, charged
as one integer per rank, then a collective. Segment ``i`` moves the ranks'
states (clock, tx_free, rx_free per rank) by adding ``costs[r][i]`` to each
clock and running collective ``i`` through the cached simulation
(``interconnect.sim``), as each phantom card's ``collectives._emulated`` would.

Every segment commutes with a shift of time: moving all entry states by ``d``
moves all results by ``d`` (integer max-plus arithmetic; the simulation cache
already relies on it). Layers repeat: when the states at segment ``i`` are
those at ``i - p`` shifted by ``d``, and the segments from ``i`` on repeat the
``p`` before them, each further period adds exactly ``d``, so ``walk`` jumps
over those periods instead of simulating them. The result is the same integers
as walking every segment; only the number of simulated segments changes.

A step whose layers run in chunks (``devices.schedule``) overlaps collectives
with compute on each card's two engines; ``walk_tasks`` walks its tasks for all
ranks the same way, without jumps.
"""
from __future__ import annotations

from devices.schedule import COMPUTE, DMA, start_of
from interconnect import sim
from interconnect.sim import Call

MAX_PERIOD = 8  # segments per repeating pattern that a jump looks for (states may cycle over several layers)


def walk(costs: list[list[int]], calls: list, cards: list[int], topology, reduce_ns,
         clocks: list[int], ports: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Every rank's (clock, (tx_free, rx_free)) after the step.

    ``costs[r][i]``: compute ns of segment ``i`` on rank ``r``; ``calls[i]``: collective ``i``, a
    ``Call`` that every rank runs, or one ``Call`` per rank (as each card sizes it)."""
    n, num_segments = len(cards), len(costs[0])
    cards = tuple(cards)
    cols = list(zip(*costs))  # per segment, its cost on each rank
    sigs = [(cols[i], calls[i] if i < len(calls) else None) for i in range(num_segments)]
    state = (tuple(clocks), tuple(p[0] for p in ports), tuple(p[1] for p in ports))
    history = []  # states at the start of each segment walked
    i = 0
    while i < num_segments:
        history.append(state)
        jump = _jump(history, sigs, i)
        if jump:
            periods, p, d = jump
            i += periods * p
            state = tuple(tuple(x + periods * d for x in part) for part in state)
            history.clear()
            continue
        clk, txs, rxs = state
        clk = tuple(c + d for c, d in zip(clk, cols[i]))
        call = sigs[i][1]
        if call is not None and n > 1:
            clk, txs, rxs = _collective(call, cards, topology, reduce_ns, clk, txs, rxs)
        state = (clk, txs, rxs)
        i += 1
    clk, txs, rxs = state
    return list(clk), list(zip(txs, rxs))


def _collective(call, cards, topology, reduce_ns, clk, txs, rxs):
    n = len(cards)
    states = list(zip(clk, txs, rxs))
    if isinstance(call, Call):
        out = sim.CACHE.run(call, cards, topology, reduce_ns, states)
    else:  # ranks that size the call differently: each takes its own simulation's result
        runs = {c: sim.CACHE.run(c, cards, topology, reduce_ns, states) for c in dict.fromkeys(call)}
        out = [runs[call[r]][r] for r in range(n)]
    return (tuple(c for c, _, _ in out), tuple(old if t is None else t for (_, t, _), old in zip(out, txs)),
            tuple(old if r is None else r for (_, _, r), old in zip(out, rxs)))


def _jump(history: list, sigs: list, i: int):
    """(periods, p, d) to jump from segment ``i``, or None: the state at ``i`` is the one ``p``
    segments earlier shifted by ``d``, and ``periods`` whole periods from ``i`` repeat the last."""
    now = history[-1]
    for p in range(1, min(MAX_PERIOD, len(history) - 1) + 1):
        then = history[-1 - p]
        d = now[0][0] - then[0][0]
        if not all(a - b == d for part_now, part_then in zip(now, then) for a, b in zip(part_now, part_then)):
            continue
        run = 0
        while i + run < len(sigs) and sigs[i + run] == sigs[i + run - p]:
            run += 1
        if run >= p:
            return run // p, p, d
    return None


def fold(tasks: list, task_costs: list[int]) -> list[int]:
    """An unchunked step's tasks (each after the one before it) as the segments ``walk`` takes:
    per collective, the ns of the compute tasks before it, then the ns after the last one.
    ``task_costs``: the ns of each compute task, in order."""
    out, acc, costs = [], 0, iter(task_costs)
    for task in tasks:
        if task.engine == COMPUTE:
            acc += next(costs)
        else:
            out.append(acc)
            acc = 0
    out.append(acc)
    return out


def walk_tasks(tasks: list, costs: list[list[int]], calls: list, cards: list[int], topology, reduce_ns,
               clocks: list[int], ports: list[tuple[int, int]], on_task=None
               ) -> tuple[list[int], list[tuple[int, int]]]:
    """Every rank's (clock, (tx_free, rx_free)) after a step of tasks on two engines
    (``devices.schedule``): each rank's engines on their own timelines, each collective simulated
    from the ranks' states when it starts. ``costs[r][j]``: ns of compute task ``j`` on rank ``r``;
    ``calls[j]``: collective task ``j`` (a ``Call``, or one per rank). ``on_task(i, starts, ends, call)``
    is told each task's times. With one chunk this is ``walk`` (which jumps over repeating layers)."""
    n, cards = len(cards), tuple(cards)
    free = [{COMPUTE: c, DMA: c} for c in clocks]
    ready = [[0] * len(tasks) for _ in range(n)]
    txs, rxs = tuple(p[0] for p in ports), tuple(p[1] for p in ports)
    jc = jd = 0
    for i, task in enumerate(tasks):
        starts = [start_of(task, free[r], ready[r]) for r in range(n)]
        call = None
        if task.engine == COMPUTE:
            ends = [starts[r] + costs[r][jc] for r in range(n)]
            jc += 1
        else:
            call = calls[jd]
            jd += 1
            ends = list(starts)
            if n > 1:
                ends, txs, rxs = _collective(call, cards, topology, reduce_ns, tuple(starts), txs, rxs)
        for r in range(n):
            free[r][task.engine] = ready[r][i] = ends[r]
        if on_task is not None:
            on_task(i, starts, list(ends), call)
    return [max(f.values()) for f in free], list(zip(txs, rxs))
