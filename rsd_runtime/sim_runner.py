"""Running step plans of one instance in this process, on the emulated clock alone.

``SimRunner`` does what ``CardRunner`` does with phantom cards, without card
processes: it walks the phantom executors' segments (``devices.phantom``) for
all tp ranks at once, each rank with its own emulated clock and fabric ports,
and runs each collective through the simulation phantom cards use
(``interconnect.sim``) from the ranks' entry states. The emulated times are
the phantom cards' (tested step by step against card processes); a replay of
a rack runs hundreds of steps per second this way.
"""
from __future__ import annotations

from devices.cost import CostModel
from devices.phantom import collective_call, segments
from devices.walk import walk
from devices.spec import DeviceSpec
from devices.step import StepCosts, StepPlan
from interconnect.emulation import memory_reduce_ns
from rsd_runtime.compiler import CardProgram
from rsd_runtime.model_config import ModelConfig


class SimRunner:
    phantom = True

    def __init__(self, programs: list[CardProgram], cfg: ModelConfig, spec: DeviceSpec, topology, *,
                 dtype: str, weight_dtype: str):
        self.topology = topology
        self.reduce_ns = memory_reduce_ns(spec.memory_bw, spec.memory_efficiency)
        self.cards = [p.card for p in programs]
        shapes = cfg.tensor_shapes()
        cost = CostModel(spec, weight_dtype, dtype)
        self.costs = []
        for prog in programs:
            weights = {s.name: s.shape(shapes[s.source]) for s in prog.shards}
            self.costs.append(StepCosts(cost, {**prog.meta, "compute_dtype": dtype, "weight_dtype": weight_dtype},
                                        weights))
        self.segments = [segments(p.ops) for p in programs]
        if len({tuple((len(ops), op and op["op"]) for ops, op in segs) for segs in self.segments}) != 1:
            raise ValueError("the ranks' command streams do not line up collective for collective")
        # ranks whose streams cost the same (same op kinds and weight shapes) share one cost walk
        sig = [tuple((op["op"], c.shapes.get(op.get("w")), op.get("b") is not None) for op in p.ops)
               for p, c in zip(programs, self.costs)]
        self.same_as = [sig.index(s) for s in sig]
        self.clocks = [0] * len(programs)
        self.ports = [(0, 0)] * len(programs)  # (tx_free, rx_free) per rank
        self.broken = None

    def run(self, plan: StepPlan) -> tuple[None, int]:
        """(None: phantom cards return no logits; emulated end of the step, ns)."""
        n = len(self.cards)
        segs = self.segments[0]
        costs = [[self.costs[r].segment_ns(i, self.segments[r][i][0], plan) for i in range(len(segs))]
                 if self.same_as[r] == r else None for r in range(n)]
        costs = [costs[self.same_as[r]] for r in range(n)]
        calls = [collective_call(op, self.costs[0], plan) for _, op in segs if op is not None]
        clocks = [max(c, plan.t_start) for c in self.clocks]
        self.clocks, self.ports = walk(costs, calls, self.cards, self.topology, self.reduce_ns, clocks, self.ports)
        return None, max(self.clocks)

    def resync(self) -> None:
        pass
