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
from devices.spec import DeviceSpec
from devices.step import StepCosts, StepPlan
from interconnect import sim
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
        clocks = [max(c, plan.t_start) for c in self.clocks]
        ports = self.ports
        same = self.same_as
        for i in range(len(self.segments[0])):
            ns = [self.costs[r].segment_ns(i, self.segments[r][i][0], plan) if same[r] == r else None
                  for r in range(n)]
            for r in range(n):
                clocks[r] += ns[same[r]]
            op = self.segments[0][i][1]
            if op is None or n == 1:
                continue
            call = collective_call(op, self.costs[0], plan)
            states = [(clocks[r], *ports[r]) for r in range(n)]
            out = sim.CACHE.run(call, self.cards, self.topology, self.reduce_ns, states)
            clocks = [c for c, _, _ in out]
            ports = [(tx if tx is not None else old[0], rx if rx is not None else old[1])
                     for (_, tx, rx), old in zip(out, ports)]
        self.clocks, self.ports = clocks, ports
        return None, max(clocks)

    def resync(self) -> None:
        pass
