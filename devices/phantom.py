"""The phantom executor: the same command stream, no weights, no math.

It advances the card's emulated clock by exactly what the real executor
charges (``devices.step``) and runs every collective with the payload's
nominal size, so peers and links are charged as for real data (phantom
collectives simulate themselves from the group's entry states:
``interconnect.sim``). It needs no torch: a rack of phantom cards fits in a
few GB of host memory.

It walks the same tasks on the same two engines as the real executor
(``devices.schedule``, ``devices.program``); ``rsd_runtime.sim_runner`` walks
them for all ranks of an instance at once.
"""
from __future__ import annotations

import numpy as np

from devices.program import StepProgram
from devices.schedule import chunk_count, split_plan, walk, WHOLE
from devices.step import StepPlan
from interconnect import collectives as coll


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
        clock, prog = self.clock, self.program
        k = chunk_count(step, step.chunks)
        tasks = prog.tasks(k)
        plans = split_plan(step, k)

        def plan_of(task):
            return step if task.chunk == WHOLE else plans[task.chunk]

        def compute(i, start):
            return start + prog.compute_ns(tasks[i].ops, plan_of(tasks[i]))

        def collective(i, start):
            op = self.ops[tasks[i].ops[0]]
            call = prog.call(op, plan_of(tasks[i]))
            clock.now = start
            if op["op"] == "all_reduce":
                coll.all_reduce(np.empty(call.count, np.uint8), "sum", self.group, dtype="uint8")
            else:
                coll.all_gather(np.empty(call.count * self.group.size, np.uint8), np.empty(call.count, np.uint8),
                                self.group, dtype="uint8")
            return clock.now

        clock.now = max(walk(tasks, clock.now, compute, collective).values())
        return None
