"""The phantom executor: the same command stream, no weights, no math.

It advances the card's emulated clock by exactly what the real executor
charges (``devices.step``) and runs every collective with headers that state
the nominal payload size, so peers and links are charged as for real data.
It needs no torch: a rack of phantom cards fits in a few GB of host memory.
"""
from __future__ import annotations

import numpy as np

from devices.cost import CostModel
from devices.step import StepCosts, StepPlan
from interconnect import collectives as coll


class PhantomExecutor:
    def __init__(self, card, program: dict, group):
        self.card = card
        self.ops = program["ops"]
        meta = program["meta"]
        cost = CostModel(card.spec, meta["weight_dtype"], meta["compute_dtype"])
        self.costs = StepCosts(cost, meta, {n: tuple(e[2]) for n, e in card.arena.entries.items()})
        self.group = group
        self.rank = meta["tp_rank"]
        self.vocab_size = meta["vocab_size"]

    def step(self, step: StepPlan) -> None:
        clock = self.card.clock
        for op in self.ops:
            cost = self.costs.of(op, step)
            if cost is not None:
                clock.now += self.costs.cost.time_ns(cost)
            elif op["op"] == "all_reduce":
                buf = np.empty(self.costs.comm_bytes(op, step), np.uint8)
                coll.all_reduce(buf, "sum", self.group, dtype="uint8")
            elif op["op"] == "all_gather":
                piece = np.empty(self.costs.comm_bytes(op, step), np.uint8)
                coll.all_gather(np.empty(piece.size * self.group.size, np.uint8), piece, self.group, dtype="uint8")
        return None
