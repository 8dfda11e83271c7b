"""A card's command stream ready to step: its tasks (``devices.schedule``), their launch groups
(``devices.fusion``) and what each costs in a step (``devices.step``).

Shared by the real executor, the phantom one and the in-process simulation, so
that all three charge the same integer nanoseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices import fusion, schedule
from devices.cost import CostModel
from devices.spec import DeviceSpec
from devices.step import StepCosts, StepPlan
from interconnect.sim import Call


@dataclass(slots=True, frozen=True)
class Span:
    """One launch on the compute engine, or one collective: what a trace draws and a breakdown sums."""
    name: str
    kind: str  # matmul, attention, norm, elementwise, embed, fused, all_reduce, all_gather
    ns: int
    flops: int
    bytes: int
    spill: int = 0


_KIND = {"linear": "matmul", "attention": "attention", "rmsnorm": "norm", "add": "elementwise",
         "silu_mul": "elementwise", "embed": "embed"}


class StepProgram:
    def __init__(self, ops: list[dict], meta: dict, spec: DeviceSpec, shapes: dict[str, tuple]):
        self.ops = ops
        self.fusion = meta.get("fusion", "none")
        if self.fusion not in fusion.FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; known: {', '.join(fusion.FUSIONS)}")
        self.model = CostModel(spec, meta["weight_dtype"], meta["compute_dtype"])
        self.costs = StepCosts(self.model, meta, shapes)
        self.sram_bytes = spec.sram_bytes
        self.readers = fusion.readers_of(ops)
        self.tail_inputs = _tail_inputs(ops)
        self._tasks: dict[int, list[schedule.Task]] = {}
        self._groups: dict[tuple, list[tuple[int, ...]]] = {}
        self._memo: dict[tuple, int | tuple] = {}
        self._attn: dict[int, tuple] = {}

    def tasks(self, num_chunks: int) -> list[schedule.Task]:
        got = self._tasks.get(num_chunks)
        if got is None:
            got = self._tasks[num_chunks] = schedule.build_tasks(self.ops, num_chunks)
        return got

    def groups(self, run: tuple[int, ...]) -> list[tuple[int, ...]]:
        got = self._groups.get(run)
        if got is None:
            got = self._groups[run] = fusion.groups(run, self.ops, self.fusion)
        return got

    # -- what a task costs ---------------------------------------------------------------
    def compute_ns(self, run: tuple[int, ...], step: StepPlan) -> int:
        """Emulated ns of a compute task (a run of ops) in ``step``, remembered per shape of the step."""
        if self.fusion == "none":
            key = (run, step.num_tokens, len(step.logit_rows))
            got = self._memo.get(key)
            if got is None:
                got = (sum(self.costs.time_ns(self.ops[i], step) or 0 for i in run
                           if self.ops[i]["op"] != "attention"),
                       sum(1 for i in run if self.ops[i]["op"] == "attention"))
                if len(self._memo) > 8192:
                    self._memo.clear()
                self._memo[key] = got
            fixed, n_attn = got
            return fixed + n_attn * self._attention_ns(step) if n_attn else fixed
        return sum(s.ns for s in self._fused(run, step))

    def _attention_ns(self, step: StepPlan) -> int:
        """Attention costs the same in every layer of a step (or of a chunk of it)."""
        got = self._attn.get(id(step))
        if got is None or got[0] is not step:  # the plan is held, so its id cannot be reused meanwhile
            if len(self._attn) > 64:
                self._attn.clear()
            got = self._attn[id(step)] = (step, self.model.time_ns(self.costs.of({"op": "attention"}, step)))
        return got[1]

    def _fused(self, run: tuple[int, ...], step: StepPlan) -> list[Span]:
        out = []
        for g in self.groups(run):
            attn = any(self.ops[i]["op"] == "attention" for i in g)
            key = ("g", g, step.num_tokens, len(step.logit_rows))
            span = None if attn else self._memo.get(key)
            if span is None:
                got = fusion.group_cost(self.costs, self.ops, self.readers, g, step, self.sram_bytes)
                if got is None:
                    continue
                cost, spill = got
                span = Span(_group_name(self.ops, g), _group_kind(self.ops, g), self.model.time_ns(cost),
                            cost.flops, cost.bytes, spill)
                if not attn:
                    if len(self._memo) > 8192:
                        self._memo.clear()
                    self._memo[key] = span
            out.append(span)
        return out

    def spans(self, run: tuple[int, ...], step: StepPlan) -> list[Span]:
        """The launches of a compute task, in order (their ns sum to ``compute_ns``)."""
        if self.fusion != "none":
            return self._fused(run, step)
        out = []
        for i in run:
            op = self.ops[i]
            cost = self.costs.of(op, step)
            if cost is None:
                continue
            ns = self._attention_ns(step) if op["op"] == "attention" else self.costs.time_ns(op, step)
            out.append(Span(_op_name(op), _KIND[op["op"]], ns, cost.flops, cost.bytes))
        return out

    def call(self, op: dict, step: StepPlan) -> Call:
        """The collective of a stream op as the simulation runs it: its nominal bytes as uint8."""
        return Call(op["op"], self.costs.comm_bytes(op, step), "uint8", "auto")


def _op_name(op: dict) -> str:
    if op["op"] == "attention":
        return f"attention l{op['layer']}"
    return f"{op['op']} {op['w']}" if op.get("w") else op["op"]


def _group_name(ops: list[dict], g: tuple[int, ...]) -> str:
    return _op_name(ops[g[0]]) if len(g) == 1 else "fused " + "+".join(_op_name(ops[i]) for i in g)


def _group_kind(ops: list[dict], g: tuple[int, ...]) -> str:
    kinds = {_KIND.get(ops[i]["op"]) for i in g} - {None}
    return kinds.pop() if len(kinds) == 1 else "fused"


def _tail_inputs(ops: list[dict]) -> tuple[str, ...]:
    """Values the tail reads that the layers made (the residual stream ``x``)."""
    tail = schedule.tail_start(ops)
    made, need = set(), []
    for op in ops[tail:]:
        need += [n for n in fusion.reads(op) if n not in made and n not in need]
        made.update(fusion.writes(op))
    return tuple(need)
