"""One step of a command stream: the plan the host sends, and what each op of the stream costs in it.

The host builds one ``StepPlan`` per step and packs it once; every card of the
instance receives the same bytes and checks every index in it against its own
stores before it touches a KV block (``StepPlan.unpack``). The costs are shared
by the real executor and the phantom one, so that both advance the emulated
clock by exactly the same amounts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from devices.cost import CostModel, OpCost


MAX_CHUNKS = 16  # the most row chunks a step's layers may be pipelined in


class PlanError(ValueError):
    """A step plan that names something the card does not have (a KV block, a row, a token)."""


@dataclass(slots=True)
class SeqSlice:
    """One sequence's part of a step: rows [row, row + num_tokens) feed positions [start, start + num_tokens)."""
    row: int
    num_tokens: int
    start: int
    block_table: list[int]

    @property
    def context(self) -> int:
        """Tokens of the sequence in the KV cache once this step has run."""
        return self.start + self.num_tokens


@dataclass(slots=True)
class StepPlan:
    t_start: int  # host's emulated clock when it sends the step, ns
    seqs: list[SeqSlice]
    logit_rows: list[int]  # rows whose logits the step returns, in order
    token_ids: np.ndarray | None = None  # (num_tokens,) int32; None on phantom cards
    output_rank: int = 0  # the tp rank that returns the logits
    chunks: int = 1  # the layers run in this many row chunks (``devices.schedule``; 1: no pipelining)
    num_tokens: int = field(init=False, default=0)

    def __post_init__(self):
        self.num_tokens = sum(s.num_tokens for s in self.seqs)

    @property
    def positions(self) -> np.ndarray:
        return np.concatenate([np.arange(s.start, s.context) for s in self.seqs]) if self.seqs else np.zeros(0)

    # -- wire form: one msgpack blob, the same bytes for every card -------------------------------
    def pack(self) -> bytes:
        doc = {"t": self.t_start, "seqs": [[s.row, s.num_tokens, s.start, s.block_table] for s in self.seqs],
               "rows": self.logit_rows, "out": self.output_rank}
        if self.chunks != 1:
            doc["ch"] = self.chunks
        if self.token_ids is not None:
            doc["tok"] = np.ascontiguousarray(self.token_ids, np.int32).tobytes()
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def unpack(cls, blob, *, num_blocks: int, block_size: int, vocab_size: int, real: bool) -> "StepPlan":
        """Decode and check a plan against a card's KV cache and vocabulary; PlanError names the bad field.

        A phantom card (``real=False``) touches no KV block and reads no token: the host sends it
        neither block tables nor token ids, and only the shape is checked.
        """
        try:
            doc = msgpack.unpackb(bytes(blob), raw=False)
        except Exception as exc:
            raise PlanError(f"step plan is not valid msgpack: {exc}") from None
        if not isinstance(doc, dict):
            raise PlanError("step plan must be a map")
        t_start = _int(doc.get("t"), "t_start", 0)
        raw_seqs = doc.get("seqs")
        if not isinstance(raw_seqs, list) or not raw_seqs:
            raise PlanError("step plan: seqs must be a non-empty list")
        seqs, row, blocks = [], 0, []
        for i, s in enumerate(raw_seqs):
            if not isinstance(s, list) or len(s) != 4 or not isinstance(s[3], list):
                raise PlanError(f"step plan: seqs[{i}] must be [row, num_tokens, start, block_table]")
            r = _int(s[0], f"seqs[{i}].row", 0)
            n = _int(s[1], f"seqs[{i}].num_tokens", 1)
            start = _int(s[2], f"seqs[{i}].start", 0)
            if r != row:
                raise PlanError(f"step plan: seqs[{i}].row is {r}, expected {row} (rows follow each other)")
            table = s[3]
            if real:
                need = -(-(start + n) // block_size)
                if len(table) < need:
                    raise PlanError(f"step plan: seqs[{i}] feeds positions up to {start + n - 1} but its block "
                                    f"table has {len(table)} blocks of {block_size} tokens")
                table = table[:need]
                blocks += table
            seqs.append(SeqSlice(r, n, start, table))
            row += n
        if real:
            _check_blocks(blocks, num_blocks)
        rows = doc.get("rows")
        if not isinstance(rows, list):
            raise PlanError("step plan: rows must be a list")
        for k in rows:
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < row:
                raise PlanError(f"step plan: logit row {k!r} is outside the step's {row} rows")
        tokens = None
        if real:
            raw = doc.get("tok")
            if not isinstance(raw, bytes) or len(raw) != 4 * row:
                raise PlanError(f"step plan: token ids must be {row} int32 values")
            tokens = np.frombuffer(raw, np.int32)
            if tokens.min() < 0 or tokens.max() >= vocab_size:
                bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
                raise PlanError(f"step plan: token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
        out = _int(doc.get("out", 0), "output_rank", 0)
        chunks = _int(doc.get("ch", 1), "chunks", 1)
        if chunks > MAX_CHUNKS:
            raise PlanError(f"step plan: chunks must be <= {MAX_CHUNKS}, got {chunks}")
        return cls(t_start, seqs, list(rows), tokens, out, chunks)


def _check_blocks(blocks: list, num_blocks: int) -> None:
    if not set(map(type, blocks)) <= {int}:
        raise PlanError(f"step plan: block tables must hold ints, got {[b for b in blocks if type(b) is not int][0]!r}")
    try:
        arr = np.asarray(blocks, dtype=np.int64)
    except OverflowError:
        raise PlanError(f"step plan: a KV block id does not fit in 64 bits; this card has blocks "
                        f"0..{num_blocks - 1}") from None
    bad = arr[(arr < 0) | (arr >= num_blocks)]
    if bad.size:
        raise PlanError(f"step plan: KV block {int(bad[0])} does not exist; this card has blocks 0..{num_blocks - 1}")
    values, counts = np.unique(arr, return_counts=True)
    if values.size != arr.size:
        raise PlanError(f"step plan: KV block {int(values[counts > 1][0])} is named twice in one step")


def _int(v, name: str, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise PlanError(f"step plan: {name} must be an int >= {lo}, got {v!r}")
    return v


# The ops StepCosts.of prices (each pays the device's fixed op overhead); the others only move data.
COMPUTE_OPS = frozenset({"embed", "rmsnorm", "linear", "add", "silu_mul", "attention"})


class StepCosts:
    """The compute cost of each op of a card's stream; None for ops that only move data."""

    def __init__(self, cost: CostModel, meta: dict, shapes: dict[str, tuple]):
        self.cost, self.meta, self.shapes = cost, meta, shapes
        self._memo: dict = {}

    def time_ns(self, op: dict, step: StepPlan) -> int | None:
        """Emulated ns of ``op`` in ``step`` (None for ops that only move data), remembered: ops of the
        same kind and shape cost the same in every layer (attention, which depends on the contexts, is
        remembered per step by ``devices.program``)."""
        kind = op["op"]
        if kind == "attention":
            return self.cost.time_ns(self.of(op, step))
        key = (kind, self.shapes.get(op.get("w")), op.get("b") is not None, op.get("out") == "logits",
               step.num_tokens, len(step.logit_rows))
        ns = self._memo.get(key, -1)
        if ns == -1:
            cost = self.of(op, step)
            ns = None if cost is None else self.cost.time_ns(cost)
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = ns
        return ns

    def of(self, op: dict, step: StepPlan) -> OpCost | None:
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
            return self.cost.attention([(s.num_tokens, s.context) for s in step.seqs], m["num_heads"],
                                       m["num_kv_heads"], m["head_dim"])
        return None

    def comm_bytes(self, op: dict, step: StepPlan) -> int:
        """Bytes each card contributes to a collective of the stream."""
        if op["op"] == "all_reduce":
            return step.num_tokens * self.meta["hidden_size"] * self.cost.a
        if op["op"] == "all_gather":
            return len(step.logit_rows) * self.meta["vocab_local"] * self.cost.a
        raise ValueError(f"{op['op']} is not a collective")
