"""Where a step's time goes, on the emulated clock (``bench.inference --breakdown``).

One step is run from idle cards in the instance's in-process simulation and
card 0's two engines are read:

* compute, by kind of launch: matmuls, attention, norms, element-wise ops,
  embedding, fused groups (``--fusion ops|layer`` puts several kinds in one);
* collectives: ``exposed`` is the time card 0's compute engine waits
  (step time minus its busy time), ``hidden`` what remains of the collectives'
  time, which ran beside compute;
* host: what the host's work adds to the step (``rsd_runtime.host_spec``):
  all of it when serialised, the sampling and what of the preparation did not
  fit under the cards' time when async.

The rows add up to the step time plus the hidden collectives.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from devices.schedule import COMPUTE
from devices.step import SeqSlice, StepPlan


@dataclass(slots=True)
class Breakdown:
    step_ns: int = 0
    compute: dict[str, int] = field(default_factory=dict)  # kind -> ns on card 0
    comm_ns: int = 0  # card 0's data-movement engine busy
    chunks: int = 1
    host_ns: int = 0

    @property
    def exposed_ns(self) -> int:
        return self.step_ns - sum(self.compute.values())

    @property
    def hidden_ns(self) -> int:
        return max(0, self.comm_ns - self.exposed_ns)

    def rows(self) -> list[tuple[str, int]]:
        return ([(k, v) for k, v in sorted(self.compute.items(), key=lambda kv: -kv[1])]
                + [("collectives exposed", self.exposed_ns), ("collectives hidden", self.hidden_ns),
                   ("host", self.host_ns)])


class _Collector:
    def __init__(self, out: Breakdown):
        self.out = out

    def on_task(self, task, starts, ends, step, progs, call=None) -> None:
        if task.engine == COMPUTE:
            for s in progs[0].spans(task.ops, step):
                self.out.compute[s.kind] = self.out.compute.get(s.kind, 0) + s.ns
        else:
            self.out.comm_ns += ends[0] - starts[0]


def step_breakdown(engine, seqs: list[tuple[int, int]], host=None) -> Breakdown:
    """The breakdown of one step feeding (tokens, first position) per sequence, each sampling,
    with ``engine``'s compiler choices (its fusion, its overlap)."""
    layout, rows, row = [], [], 0
    for n, p0 in seqs:
        layout.append(SeqSlice(row, n, p0, []))
        rows.append(row + n - 1)
        row += n
    plan = StepPlan(0, layout, rows)
    if engine.pipeliner is not None:
        plan = engine.pipeliner.apply(plan)
    out = Breakdown(chunks=plan.chunks)
    sim = engine.simulator()
    sim.tracer = _Collector(out)
    _, out.step_ns = sim.run(replace(plan, t_start=0))
    if host is not None:
        new = sum(1 for _, p0 in seqs if p0 == 0)
        prep = host.prepare_ns(len(seqs), new)
        start = host.start(0, prep, None if not host.async_scheduling else -out.step_ns)
        ready, done = host.finish(start + out.step_ns, len(seqs))
        out.host_ns = ready - out.step_ns
    return out
