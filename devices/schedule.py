"""A card's step as tasks on two engines, each with its own emulated timeline.

A card has a compute engine (matmuls, norms, attention) and a data-movement
engine (collectives, on the fabric's clock). The command stream is cut into
tasks: a run of compute ops between two collectives, or one collective. Each
task names the tasks whose outputs it reads; it starts when they are done and
its engine is free, and each engine runs its tasks in stream order::

    start = max(engine free, end of every task it depends on)

With ``chunks = k > 1`` (layer pipelining, ``--overlap on``) the rows of the
step (token slices of a prefill, batch slices of a decode) are cut into k
chunks and the decoder layers run chunk after chunk: the all_reduce of chunk i
runs on the data-movement engine while the compute engine works on chunk i+1.
The tail (final norm, LM head, logits gather) runs on the whole step once every
chunk is through its last layer. With k = 1 every task depends on the one
before it and the timeline is the sequential one: compute, then collective,
then compute.

The real executor, the phantom one and the in-process simulation
(``rsd_runtime.sim_runner``) all walk these tasks with ``walk``, so they
charge the same times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from devices.step import SeqSlice, StepPlan

COLLECTIVES = ("all_reduce", "all_gather")
COMPUTE, DMA = "compute", "dma"
ENGINES = (COMPUTE, DMA)
WHOLE = -1  # chunk index of the tail's tasks: the whole step


@dataclass(slots=True, frozen=True)
class Task:
    engine: str  # COMPUTE or DMA
    chunk: int  # which chunk of the step's rows; WHOLE for the tail
    ops: tuple[int, ...]  # indices into the program's ops (one collective on DMA)
    deps: tuple[int, ...]  # indices of the tasks whose outputs it reads


def tail_start(ops: list[dict]) -> int:
    """Index of the first op after the last decoder layer: the final norm (the ``norm`` weight)."""
    for i in range(len(ops) - 1, -1, -1):
        if ops[i]["op"] == "rmsnorm" and ops[i].get("w") == "norm":
            return i
    return len(ops)


def _runs(indices: list[int], ops: list[dict]) -> list[tuple[list[int], int | None]]:
    """[(compute op indices, the collective after them or None)] in stream order."""
    out, run = [], []
    for i in indices:
        if ops[i]["op"] in COLLECTIVES:
            out.append((run, i))
            run = []
        else:
            run.append(i)
    out.append((run, None))
    return out


def build_tasks(ops: list[dict], num_chunks: int) -> list[Task]:
    """The tasks of a step whose layers run in ``num_chunks`` chunks (see the module doc)."""
    tail = tail_start(ops)
    tasks: list[Task] = []

    def add(engine, chunk, idx, deps):
        tasks.append(Task(engine, chunk, tuple(idx), tuple(d for d in deps if d is not None)))
        return len(tasks) - 1

    body = _runs(list(range(tail)), ops)
    last = [None] * num_chunks  # the last task of each chunk
    for run, coll in body:
        for c in range(num_chunks):
            if run:
                last[c] = add(COMPUTE, c, run, [last[c]])
            if coll is not None:
                last[c] = add(DMA, c, [coll], [last[c]])
    deps = last
    for run, coll in _runs(list(range(tail, len(ops))), ops):
        if run:
            deps = [add(COMPUTE, WHOLE, run, deps)]
        if coll is not None:
            deps = [add(DMA, WHOLE, [coll], deps)]
    return tasks


def chunk_count(plan: StepPlan, wanted: int) -> int:
    """Chunks a step can be cut into: at most one per row."""
    return max(1, min(wanted, plan.num_tokens))


def split_plan(plan: StepPlan, num_chunks: int) -> list[StepPlan]:
    """The step's rows cut into ``num_chunks`` contiguous slices, each a plan of its own.

    A sequence cut in two becomes two slices of it (a prefill's token slices, the later one
    attending to the earlier one's keys); a decode step is cut between sequences. The chunk
    plans return no logits (the tail runs on the whole step)."""
    if num_chunks == 1:
        return [plan]
    T = plan.num_tokens
    bounds = [T * c // num_chunks for c in range(num_chunks + 1)]
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        seqs = []
        for s in plan.seqs:
            a, b = max(lo, s.row), min(hi, s.row + s.num_tokens)
            if a < b:
                seqs.append(SeqSlice(a - lo, b - a, s.start + a - s.row, s.block_table))
        tokens = None if plan.token_ids is None else plan.token_ids[lo:hi]
        out.append(StepPlan(plan.t_start, seqs, [], tokens, plan.output_rank))
    return out


def start_of(task: Task, free: dict[str, int], ready: list[int]) -> int:
    """When a task starts: its engine is free and every task it depends on is done."""
    start = free[task.engine]
    for d in task.deps:
        if ready[d] > start:
            start = ready[d]
    return start


def walk(tasks: list[Task], t0: int, compute: Callable[[int, int], int],
         collective: Callable[[int, int], int]) -> dict[str, int]:
    """Run the tasks in order on their engines from t0; ``compute(i, start)`` returns the end of
    compute task i, ``collective(i, start)`` the end of collective task i. Returns when each
    engine became free."""
    free = {COMPUTE: t0, DMA: t0}
    ready = [0] * len(tasks)
    for i, t in enumerate(tasks):
        start = start_of(t, free, ready)
        end = compute(i, start) if t.engine == COMPUTE else collective(i, start)
        free[t.engine] = ready[i] = end
    return free

