"""Running step plans of one instance in this process, on the emulated clock alone.

``SimRunner`` does what ``CardRunner`` does with phantom cards, without card
processes: it walks the tasks the cards walk (``devices.schedule``) for all
tp ranks at once, each engine of each rank on its own timeline and each rank
with its own fabric ports, and runs each collective through the simulation phantom cards use
(``interconnect.sim``) from the ranks' entry states. The emulated times are
the phantom cards' (tested step by step against card processes); a replay of
a rack runs hundreds of steps per second this way.
"""
from __future__ import annotations

from devices.program import StepProgram
from devices.schedule import COMPUTE, DMA, WHOLE, chunk_count, split_plan, start_of
from devices.spec import DeviceSpec
from devices.step import StepPlan
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

    def run(self, plan: StepPlan) -> tuple[None, int]:
        """(None: phantom cards return no logits; emulated end of the step, ns)."""
        n, same, progs = len(self.cards), self.same_as, self.progs
        k = chunk_count(plan, plan.chunks)
        tasks = progs[0].tasks(k)
        plans = split_plan(plan, k)
        free = [{COMPUTE: t, DMA: t} for t in (max(c, plan.t_start) for c in self.clocks)]
        ready = [[0] * len(tasks) for _ in range(n)]
        ports = self.ports
        for i, task in enumerate(tasks):
            step = plan if task.chunk == WHOLE else plans[task.chunk]
            starts = [start_of(task, free[r], ready[r]) for r in range(n)]
            call = None
            if task.engine == COMPUTE:
                ns = [progs[r].compute_ns(task.ops, step) if same[r] == r else None for r in range(n)]
                ends = [starts[r] + ns[same[r]] for r in range(n)]
            else:
                call = progs[0].call(progs[0].ops[task.ops[0]], step)
                out = sim.CACHE.run(call, self.cards, self.topology, self.reduce_ns,
                                    [(starts[r], *ports[r]) for r in range(n)])
                ends = [c for c, _, _ in out]
                ports = [(tx if tx is not None else old[0], rx if rx is not None else old[1])
                         for (_, tx, rx), old in zip(out, ports)]
            for r in range(n):
                free[r][task.engine] = ready[r][i] = ends[r]
            if self.tracer is not None:
                self.tracer.on_task(task, starts, ends, step, progs, call)
        self.clocks = [max(f.values()) for f in free]
        self.ports = ports
        return None, max(self.clocks)

    def resync(self) -> None:
        pass
