"""Binary-tree algorithms: 2 ceil(log2 n) latency terms, whole messages per edge.

Ranks are placed in a binary heap relative to the root: relative rank q has
children 2q+1 and 2q+2 and parent (q-1)//2. Latency-optimal for small
messages; for large ones the ring moves fewer bytes per card.
"""
from __future__ import annotations

import numpy as np

from interconnect.group import Pending, ProcessGroup, split
from interconnect.reduce import ReduceOp


class Heap:
    def __init__(self, g: ProcessGroup, root: int):
        self.g, self.root, self.n = g, root, g.size
        self.q = (g.rank - root) % g.size

    def rank_of(self, q: int) -> int:
        return (q + self.root) % self.n

    @property
    def parent(self) -> int | None:
        return None if self.q == 0 else self.rank_of((self.q - 1) // 2)

    @property
    def children(self) -> list[int]:
        return [self.rank_of(c) for c in (2 * self.q + 1, 2 * self.q + 2) if c < self.n]

    def subtree(self, q: int | None = None) -> list[int]:
        """Group ranks under relative rank q (itself first, then breadth first)."""
        out, todo = [], [self.q if q is None else q]
        while todo:
            c = todo.pop(0)
            if c < self.n:
                out.append(self.rank_of(c))
                todo += [2 * c + 1, 2 * c + 2]
        return out

    def up_flows(self) -> tuple:
        return self.g.flows((self.rank_of(c), self.rank_of((c - 1) // 2)) for c in range(1, self.n))

    def down_flows(self) -> tuple:
        return self.g.flows((self.rank_of((c - 1) // 2), self.rank_of(c)) for c in range(1, self.n))


def reduce(g: ProcessGroup, work: np.ndarray, root: int, op: ReduceOp, dtype: str, seq: int) -> None:
    """``work`` (a private copy) holds the full reduction at ``root`` on return."""
    h = Heap(g, root)
    for child in h.children:  # fixed order: results do not depend on arrival order
        g.recv_reduce(child, g.tag(seq, 0, child), work, op, dtype)
    if h.parent is not None:
        g.send(h.parent, g.tag(seq, 0, g.rank), work, h.up_flows()).wait()


def broadcast(g: ProcessGroup, buf: np.ndarray, root: int, dtype: str, seq: int, phase: int = 1) -> None:
    h = Heap(g, root)
    if h.parent is not None:
        g.recv_into(h.parent, g.tag(seq, phase, g.rank), buf, dtype)
    pending = Pending()
    for child in h.children:
        pending.add(child, g.send(child, g.tag(seq, phase, child), buf, h.down_flows()))
    pending.settle_all()


def all_reduce(g: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, seq: int) -> None:
    reduce(g, buf, 0, op, dtype, seq)
    broadcast(g, buf, 0, dtype, seq)


def all_gather(g: ProcessGroup, out: np.ndarray, dtype: str, seq: int) -> None:
    """Gather every piece up the tree to rank 0, then broadcast the whole ``out`` down."""
    h = Heap(g, 0)
    piece = out.size // g.size
    for c in (2 * h.q + 1, 2 * h.q + 2):
        if c >= g.size:
            continue
        ranks = h.subtree(c)
        block = np.empty(piece * len(ranks), out.dtype)
        g.recv_into(h.rank_of(c), g.tag(seq, 0, h.rank_of(c)), block, dtype)
        for i, r in enumerate(ranks):
            if not g.phantom:
                out[r * piece:(r + 1) * piece] = block[i * piece:(i + 1) * piece]
    if h.parent is not None:
        if g.phantom:  # phantom buffers stay untouched
            mine = np.empty(piece * len(h.subtree()), out.dtype)
        else:
            mine = np.concatenate([out[r * piece:(r + 1) * piece] for r in h.subtree()]) if piece else out[:0]
        g.send(h.parent, g.tag(seq, 0, g.rank), mine, h.up_flows()).wait()
    broadcast(g, out, 0, dtype, seq)


def reduce_scatter(g: ProcessGroup, work: np.ndarray, op: ReduceOp, dtype: str, seq: int) -> None:
    """Reduce the whole ``work`` copy to rank 0, which sends each rank its chunk; chunk r ends in work."""
    reduce(g, work, 0, op, dtype, seq)
    chunks = split(work.size, g.size)
    if g.rank == 0:
        flows = g.flows((0, r) for r in range(1, g.size))
        pending = Pending()
        for r in range(1, g.size):
            a, b = chunks[r]
            pending.add(r, g.send(r, g.tag(seq, 2, r), work[a:b], flows))
        pending.settle_all()
    else:
        a, b = chunks[g.rank]
        g.recv_into(0, g.tag(seq, 2, g.rank), work[a:b], dtype)
