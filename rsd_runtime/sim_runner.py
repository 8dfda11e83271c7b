"""Running step plans of one instance in this process, on the emulated clock alone.

``SimRunner`` does what ``CardRunner`` does with phantom cards, without card
processes: it walks the tasks the cards walk (``devices.schedule``) for all
tp ranks at once with the walk phantom cards use (``devices.walk``), each
engine of each rank on its own timeline and each rank with its own fabric
ports, and runs each collective through the simulation (``interconnect.sim``)
from the ranks' entry states. The emulated times are
the phantom cards' (tested step by step against card processes); a replay of
a rack runs hundreds of steps per second this way.
"""
from __future__ import annotations

from devices.program import StepProgram
from devices.schedule import COMPUTE, WHOLE, chunk_count, split_plan
from devices.spec import DeviceSpec
from devices.step import StepPlan
from devices.walk import fold, walk, walk_tasks
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
        self.progs = []
        for prog in programs:
            weights = {s.name: s.shape(shapes[s.source]) for s in prog.shards}
            meta = {**prog.meta, "compute_dtype": dtype, "weight_dtype": weight_dtype}
            self.progs.append(StepProgram(prog.ops, meta, spec, weights))
        if len({tuple((t.engine, len(t.ops)) for t in p.tasks(1)) for p in self.progs}) != 1:
            raise ValueError("the ranks' command streams do not line up collective for collective")
        # ranks whose streams cost the same (same op kinds and weight shapes) share one cost walk
        sig = [tuple((op["op"], c.costs.shapes.get(op.get("w")), op.get("b") is not None) for op in p.ops)
               for p, c in zip(programs, self.progs)]
        self.same_as = [sig.index(s) for s in sig]
        self.tracer = None  # optional: on_task(task, starts, ends, plan, programs, call) per task (``trace``)
        self.clocks = [0] * len(programs)
        self.ports = [(0, 0)] * len(programs)  # (tx_free, rx_free) per rank
        self.broken = None

    def run(self, plan: StepPlan, on_sent=None) -> tuple[None, int]:
        """(None: phantom cards return no logits; emulated end of the step, ns). ``on_sent()``: called
        first, as ``CardRunner.run`` calls it once the plan is sent."""
        if on_sent is not None:
            on_sent()
        n, same, progs = len(self.cards), self.same_as, self.progs
        k = chunk_count(plan, plan.chunks)
        tasks = progs[0].tasks(k)
        plans = split_plan(plan, k)
        steps = [plan if t.chunk == WHOLE else plans[t.chunk] for t in tasks]
        costs = [[progs[r].compute_ns(t.ops, s) for t, s in zip(tasks, steps) if t.engine == COMPUTE]
                 if same[r] == r else None for r in range(n)]
        costs = [costs[same[r]] for r in range(n)]
        calls = [progs[0].call(progs[0].ops[t.ops[0]], s) for t, s in zip(tasks, steps) if t.engine != COMPUTE]
        clocks = [max(c, plan.t_start) for c in self.clocks]
        args = (self.cards, self.topology, self.reduce_ns, clocks, self.ports)
        if k == 1 and self.tracer is None:  # one task after another: segments, with jumps over repeating layers
            self.clocks, self.ports = walk([fold(tasks, c) for c in costs], calls, *args)
        else:
            tracer = self.tracer

            def on_task(i, starts, ends, call):
                tracer.on_task(tasks[i], starts, ends, steps[i], progs, call)

            hook = None if tracer is None else on_task
            self.clocks, self.ports = walk_tasks(tasks, costs, calls, *args, on_task=hook)
        return None, max(self.clocks)

    def resync(self) -> None:
        pass
