"""The phantom executor: the same command stream, no weights, no math.

It advances the card's emulated clock by exactly what the real executor
charges (``devices.step``) and runs every collective with the payload's
nominal size, so peers and links are charged as for real data. It needs no
torch: a rack of phantom cards fits in a few GB of host memory.

It walks the same tasks on the same two engines as the real executor
(``devices.schedule``, ``devices.program``). A step's clocks depend only on
every rank's entry state (clock, send port, receive port) and every rank's
task costs, so phantom cards exchange those once per step and each walks the
whole step for all ranks (``devices.walk``), running each collective through
the simulation (``interconnect.sim``): one rendezvous per step instead of one
per collective, and the same integers. ``rsd_runtime.sim_runner`` walks the
same tasks in one process.
"""
from __future__ import annotations

import numpy as np

from devices.program import StepProgram
from devices.schedule import COMPUTE, WHOLE, chunk_count, split_plan, walk
from devices.step import StepPlan
from devices.walk import fold, walk as walk_segments, walk_tasks
from interconnect import collectives as coll
from interconnect.sim import Call


class PhantomExecutor:
    def __init__(self, clock, spec, shapes: dict[str, tuple], program: dict, group):
        """``clock``: the card's emulated clock; ``shapes``: its weights' shapes by arena name."""
        self.clock = clock
        self.ops = program["ops"]
        meta = program["meta"]
        self.program = StepProgram(self.ops, meta, spec, shapes)
        self.group = group
        self.rank = meta["tp_rank"]
        self.vocab_size = meta["vocab_size"]

    def step(self, step: StepPlan) -> None:
        prog = self.program
        k = chunk_count(step, step.chunks)
        tasks = prog.tasks(k)
        plans = split_plan(step, k)
        if self.group is not None and getattr(self.group.fabric, "emulate_only", False):
            return self._step_at_once(step, k, tasks, plans)
        clock = self.clock

        def compute(i, start):
            return start + prog.compute_ns(tasks[i].ops, _plan_of(tasks[i], step, plans))

        def collective(i, start):
            op = self.ops[tasks[i].ops[0]]
            call = prog.call(op, _plan_of(tasks[i], step, plans))
            clock.now = start
            if op["op"] == "all_reduce":
                coll.all_reduce(np.empty(call.count, np.uint8), "sum", self.group, dtype="uint8")
            else:
                coll.all_gather(np.empty(call.count * self.group.size, np.uint8), np.empty(call.count, np.uint8),
                                self.group, dtype="uint8")
            return clock.now

        clock.now = max(walk(tasks, clock.now, compute, collective).values())
        return None

    def _step_at_once(self, step: StepPlan, k: int, tasks: list, plans: list[StepPlan]) -> None:
        """The step's collectives from one exchange of [clock, tx_free, rx_free, compute task costs...,
        collective sizes...] among the group (``devices.walk``)."""
        g, ports, prog = self.group, self.group.fabric.ports, self.program
        costs, counts, kinds = [], [], []
        for task in tasks:
            plan = _plan_of(task, step, plans)
            if task.engine == COMPUTE:
                costs.append(prog.compute_ns(task.ops, plan))
            else:
                op = self.ops[task.ops[0]]
                counts.append(prog.costs.comm_bytes(op, plan))
                kinds.append(op["op"])
        mine = [self.clock.now, ports.tx_free, ports.rx_free, *costs, *counts]
        rows = g.exchange(g.begin(), mine)
        if any(len(row) != len(mine) for row in rows):
            raise ValueError(f"card {g.fabric.rank}: the group's phantom streams do not line up "
                             f"({sorted({len(row) for row in rows})} values per card, {len(mine)} here)")
        m = 3 + len(costs)
        sizes = [row[m:] for row in rows]
        if all(row == sizes[0] for row in sizes):  # every rank sizes each collective alike (always, so far)
            calls = [Call(kind, count, "uint8", "auto") for kind, count in zip(kinds, sizes[0])]
        else:
            calls = [[Call(kind, row[j], "uint8", "auto") for row in sizes] for j, kind in enumerate(kinds)]
        args = (g.ranks, ports.topology, ports.reduce_ns, [row[0] for row in rows], [(row[1], row[2]) for row in rows])
        if k == 1:  # one task after another: segments, with jumps over repeating layers
            clocks, port_times = walk_segments([fold(tasks, row[3:m]) for row in rows], calls, *args)
        else:
            clocks, port_times = walk_tasks(tasks, [row[3:m] for row in rows], calls, *args)
        self.clock.now = clocks[g.rank]
        ports.tx_free, ports.rx_free = port_times[g.rank]
        return None


def _plan_of(task, step: StepPlan, plans: list[StepPlan]) -> StepPlan:
    return step if task.chunk == WHOLE else plans[task.chunk]
