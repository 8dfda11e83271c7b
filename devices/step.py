"""One step's shape and what each op of a command stream costs in it.

Shared by the real executor and the phantom one, so that both advance the
emulated clock by exactly the same amounts.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.cost import CostModel, OpCost


@dataclass(slots=True)
class StepShape:
    num_tokens: int  # T: tokens fed in this step, all sequences together
    seqs: list[tuple[int, int, int, list[int]]]  # (first row, tokens, position of the first, block table)
    logit_rows: list[int]

    @classmethod
    def parse(cls, h: dict) -> "StepShape":
        seqs = [(int(s[0]), int(s[1]), int(s[2]), list(s[3])) for s in h["seqs"]]
        return cls(sum(n for _, n, _, _ in seqs), seqs, [int(r) for r in h["logit_rows"]])


class StepCosts:
    """The compute cost of each op of a card's stream; None for ops that only move data."""

    def __init__(self, cost: CostModel, meta: dict, shapes: dict[str, tuple]):
        self.cost, self.meta, self.shapes = cost, meta, shapes

    def of(self, op: dict, step: StepShape) -> OpCost | None:
        kind, T, m = op["op"], step.num_tokens, self.meta
        if kind == "embed":
            return self.cost.embed(T, self.shapes[op["w"]][1])
        if kind == "rmsnorm":
            return self.cost.rmsnorm(T, m["hidden_size"])
        if kind == "linear":
            n_out, n_in = self.shapes[op["w"]]
            rows = len(step.logit_rows) if op["out"] == "logits" else T
            return self.cost.linear(rows, n_in, n_out, op.get("b") is not None)
        if kind == "add":
            return self.cost.elementwise(T, m["hidden_size"])
        if kind == "silu_mul":
            return self.cost.elementwise(T, m["intermediate_local"])
        if kind == "attention":
            return self.cost.attention([(n, p0 + n) for _, n, p0, _ in step.seqs], m["num_heads"],
                                       m["num_kv_heads"], m["head_dim"])
        return None

    def comm_bytes(self, op: dict, step: StepShape) -> int:
        """Bytes each card contributes to a collective of the stream."""
        if op["op"] == "all_reduce":
            return step.num_tokens * self.meta["hidden_size"] * self.cost.a
        if op["op"] == "all_gather":
            return len(step.logit_rows) * self.meta["vocab_local"] * self.cost.a
        raise ValueError(f"{op['op']} is not a collective")
