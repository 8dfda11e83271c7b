"""Fusion: which ops of a run launch together, and what memory traffic a fused group pays.

``--fusion`` is a compiler choice:

* ``none``: every op alone; it reads its inputs from and writes its output to
  device memory and pays the device's launch overhead (``DeviceSpec.op_overhead_ns``).
  This is the cost model of ``devices.cost`` op by op.
* ``ops``: the usual groups: a residual add with the norm after it, a norm with
  the matmuls that read its output (q/k/v, gate/up, the LM head), gate/up with
  the activation that multiplies them. Attention, o_proj and down_proj stay alone.
* ``layer``: a decoder layer's ops between two collectives stream as one group
  (a collective's buffer always goes through device memory: it leaves the card).

A group pays one launch, and one roofline over the sums of its FLOPs and its
device-memory bytes. The bytes are the weights and the KV cache it reads and
writes, the inputs it takes from outside the group, and the outputs read
after the group; a value made and used only inside the group stays in on-chip
SRAM. If a group's intermediates together exceed the card's SRAM, the excess
spills: written to device memory and read back (twice its bytes). The
intermediates are summed, not tracked by lifetime: a conservative bound.
"""
from __future__ import annotations

from devices.cost import OpCost

FUSIONS = ("none", "ops", "layer")
_NAMES = {"rmsnorm": ("in",), "linear": ("in",), "select_rows": ("in",), "attention": ("q", "k", "v"),
          "add": ("a", "b"), "silu_mul": ("a", "b"), "all_reduce": ("buf",), "all_gather": ("buf",),
          "output": ("buf",), "embed": ()}


def reads(op: dict) -> tuple[str, ...]:
    return tuple(op[k] for k in _NAMES.get(op["op"], ()))


def writes(op: dict) -> tuple[str, ...]:
    if op["op"] in ("all_reduce", "all_gather"):
        return (op["buf"],)
    return (op["out"],) if "out" in op else ()


def readers_of(ops: list[dict]) -> list[dict[str, tuple[int, ...]]]:
    """For each op, each value it writes -> the ops that read that value (before it is overwritten)."""
    out: list[dict[str, list[int]]] = [{} for _ in ops]
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in reads(op):
            if name in last:
                out[last[name]].setdefault(name, []).append(i)
        for name in writes(op):
            last[name] = i
            out[i].setdefault(name, [])
    return [{k: tuple(v) for k, v in d.items()} for d in out]


def groups(run: tuple[int, ...], ops: list[dict], fusion: str) -> list[tuple[int, ...]]:
    """The launch groups of a run of compute ops (indices into ``ops``), in order."""
    if fusion == "none":
        return [(i,) for i in run]
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
    out: list[list[int]] = []
    for i in run:
        if out and _joins(ops, out[-1], i, fusion):
            out[-1].append(i)
        else:
            out.append([i])
    return [tuple(g) for g in out]


def _joins(ops: list[dict], group: list[int], i: int, fusion: str) -> bool:
    op, kinds = ops[i], [ops[j]["op"] for j in group]
    if fusion == "layer":  # a new layer starts at its input norm once the group holds a matmul
        starts_layer = op["op"] == "rmsnorm" and (op["w"].endswith("in_norm") or op["w"] == "norm")
        return not (starts_layer and "linear" in kinds) and "embed" not in kinds
    made = {n for j in group for n in writes(ops[j])}
    if op["op"] == "rmsnorm":
        return kinds == ["add"]
    if op["op"] in ("linear", "select_rows"):
        return op["in"] in made and kinds[-1] in ("rmsnorm", "select_rows", "linear") and "rmsnorm" in kinds
    if op["op"] == "silu_mul":
        return op["a"] in made and op["b"] in made
    return False


def op_io(costs, op: dict, step) -> tuple[OpCost, dict[str, int], dict[str, int]] | None:
    """(the op's cost alone, bytes of each value it reads, bytes of each value it writes); what it
    moves beyond those (weights, the KV cache) is the rest of ``cost.bytes``. None for free ops."""
    cost = costs.of(op, step)
    if cost is None:
        return None
    a, m, T = costs.cost.a, costs.meta, step.num_tokens
    kind = op["op"]
    if kind == "linear":
        n_out, n_in = costs.shapes[op["w"]]
        rows = len(step.logit_rows) if op["out"] == "logits" else T
        return cost, {op["in"]: rows * n_in * a}, {op["out"]: rows * n_out * a}
    if kind == "rmsnorm":
        d = m["hidden_size"]
        return cost, {op["in"]: T * d * a}, {op["out"]: T * d * a}
    if kind in ("add", "silu_mul"):
        d = m["hidden_size"] if kind == "add" else m["intermediate_local"]
        return cost, {op["a"]: T * d * a, op["b"]: T * d * a}, {op["out"]: T * d * a}
    if kind == "embed":
        return cost, {}, {op["out"]: T * costs.shapes[op["w"]][1] * a}
    if kind == "attention":
        q, kv = T * m["num_heads"] * m["head_dim"] * a, T * m["num_kv_heads"] * m["head_dim"] * a
        return cost, {op["q"]: q, op["k"]: kv, op["v"]: kv}, {op["out"]: q}
    raise ValueError(f"no traffic model for op {kind!r}")


def group_cost(costs, ops: list[dict], readers: list[dict], group: tuple[int, ...], step,
               sram_bytes: int) -> tuple[OpCost, int] | None:
    """(FLOPs and device-memory bytes of a fused group, bytes spilled from SRAM), None if it costs nothing."""
    flops = moved = inside = 0
    made: set[str] = set()
    members = set(group)
    priced = False
    for i in group:
        io = op_io(costs, ops[i], step)
        if io is None:
            made.update(writes(ops[i]))
            continue
        priced = True
        cost, ins, outs = io
        flops += cost.flops
        moved += cost.bytes - sum(ins.values()) - sum(outs.values())  # weights, KV cache
        moved += sum(b for name, b in ins.items() if name not in made)
        for name, b in outs.items():
            users = readers[i].get(name, ())
            if users and all(u in members for u in users):
                inside += b
            else:
                moved += b
        made.update(outs)
    if not priced:
        return None
    spill = max(0, inside - sram_bytes)
    return OpCost(flops, moved + 2 * spill), spill

