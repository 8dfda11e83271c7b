"""The phantom executor: the same command stream, no weights, no math.

It advances the card's emulated clock by exactly what the real executor
charges (``devices.step``) and runs every collective with the payload's
nominal size, so peers and links are charged as for real data (phantom
collectives simulate themselves from the group's entry states:
``interconnect.sim``). It needs no torch: a rack of phantom cards fits in a
few GB of host memory.

The stream is cut into segments: the compute ops between two collectives,
charged as one integer sum, then the collective. ``rsd_runtime.sim_runner``
walks the same segments for all ranks of an instance at once.
"""
from __future__ import annotations

import numpy as np

from devices.cost import CostModel
from devices.step import StepCosts, StepPlan
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
        meta = program["meta"]
        cost = CostModel(spec, meta["weight_dtype"], meta["compute_dtype"])
        self.costs = StepCosts(cost, meta, shapes)
        self.group = group
        self.rank = meta["tp_rank"]
        self.vocab_size = meta["vocab_size"]

    def step(self, step: StepPlan) -> None:
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
