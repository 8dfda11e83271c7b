"""The phantom executor: the same command stream, no weights, no math.

It advances the card's emulated clock by exactly what the real executor
charges (``devices.step``) and runs every collective with the payload's
nominal size, so peers and links are charged as for real data. It needs no
torch: a rack of phantom cards fits in a few GB of host memory.

The stream is cut into segments: the compute ops between two collectives,
charged as one integer sum, then the collective. A step's clocks depend only on
every rank's entry state (clock, send port, receive port) and every rank's
segment costs, so phantom cards exchange those once per step and each walks the
whole step for all ranks (``walk``), running each collective through the
simulation (``interconnect.sim``, ``devices.walk``): one rendezvous per step
instead of one per collective, and the same integers. ``rsd_runtime.sim_runner`` walks the same
segments in one process.
"""
from __future__ import annotations

import numpy as np

from devices.cost import CostModel
from devices.step import StepCosts, StepPlan
from devices.walk import walk
from interconnect import collectives as coll
from interconnect.sim import Call

COLLECTIVES = ("all_reduce", "all_gather")


def segments(ops: list[dict]) -> list[tuple[list[dict], dict | None]]:
    """[(compute ops, the collective that follows them or None)], in stream order."""
    out, run = [], []
    for op in ops:
        if op["op"] in COLLECTIVES:
            out.append((run, op))
            run = []
        else:
            run.append(op)
    out.append((run, None))
    return out


def collective_call(op: dict, costs: StepCosts, step: StepPlan) -> Call:
    """The collective a phantom card runs for a stream op: its nominal bytes as uint8."""
    return Call(op["op"], costs.comm_bytes(op, step), "uint8", "auto")


class PhantomExecutor:
    def __init__(self, clock, spec, shapes: dict[str, tuple], program: dict, group):
        """``clock``: the card's emulated clock; ``shapes``: its weights' shapes by arena name."""
        self.clock = clock
        self.ops = program["ops"]
        self.segments = segments(self.ops)
        self.kinds = [op["op"] for _, op in self.segments if op is not None]
        meta = program["meta"]
        cost = CostModel(spec, meta["weight_dtype"], meta["compute_dtype"])
        self.costs = StepCosts(cost, meta, shapes)
        self.group = group
        self.rank = meta["tp_rank"]
        self.vocab_size = meta["vocab_size"]

    def step(self, step: StepPlan) -> None:
        if self.group is not None and getattr(self.group.fabric, "emulate_only", False):
            return self._step_at_once(step)
        clock = self.clock
        for i, (ops, op) in enumerate(self.segments):
            clock.now += self.costs.segment_ns(i, ops, step)
            if op is None:
                continue
            call = collective_call(op, self.costs, step)
            if op["op"] == "all_reduce":
                coll.all_reduce(np.empty(call.count, np.uint8), "sum", self.group, dtype="uint8")
            else:
                coll.all_gather(np.empty(call.count * self.group.size, np.uint8), np.empty(call.count, np.uint8),
                                self.group, dtype="uint8")
        return None

    def _step_at_once(self, step: StepPlan) -> None:
        """The step's collectives from one exchange of [clock, tx_free, rx_free, segment costs...,
        collective sizes...] among the group (``walk``)."""
        g, ports = self.group, self.group.fabric.ports
        costs = [self.costs.segment_ns(i, ops, step) for i, (ops, _) in enumerate(self.segments)]
        counts = [self.costs.comm_bytes(op, step) for _, op in self.segments if op is not None]
        mine = [self.clock.now, ports.tx_free, ports.rx_free, *costs, *counts]
        rows = g.exchange(g.begin(), mine)
        if any(len(row) != len(mine) for row in rows):
            raise ValueError(f"card {g.fabric.rank}: the group's phantom streams do not line up "
                             f"({sorted({len(row) for row in rows})} values per card, {len(mine)} here)")
        k = 3 + len(costs)
        sizes = [row[k:] for row in rows]
        if all(row == sizes[0] for row in sizes):  # every rank sizes each collective alike (always, so far)
            calls = [Call(kind, count, "uint8", "auto") for kind, count in zip(self.kinds, sizes[0])]
        else:
            calls = [[Call(kind, row[j], "uint8", "auto") for row in sizes] for j, kind in enumerate(self.kinds)]
        clocks, port_times = walk([row[3:k] for row in rows], calls, g.ranks, ports.topology, ports.reduce_ns,
                                  [row[0] for row in rows], [(row[1], row[2]) for row in rows])
        self.clock.now = clocks[g.rank]
        ports.tx_free, ports.rx_free = port_times[g.rank]
        return None
