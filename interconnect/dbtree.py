"""Double binary tree all-reduce: half the buffer on each of two complementary trees.

Tree A is NCCL's bit tree over group ranks (rank r's parent clears r's lowest
set bit and sets the next one up, or only clears it when that is out of
range); its leaves are the odd ranks. Tree B is a heap whose inner places hold
A's leaves and whose leaves hold A's inner ranks, so every rank is a leaf in
exactly one tree and forwards data in the other: each rank's links carry about
the same load, and both trees are busy at once. Each half is reduced up its
tree and broadcast down in pieces, pipelined: a rank passes piece i on before
it takes piece i+1.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from interconnect.group import Pending, ProcessGroup, split
from interconnect.reduce import ReduceOp

PIPELINE_BYTES = 1 << 20  # piece size, as the ring's chains
MAX_PIECES = 64  # large buffers are cut into at most this many pieces per tree


@lru_cache(maxsize=256)
def trees(n: int) -> tuple[tuple, tuple]:
    """(parent of each rank in tree A, in tree B); a root's parent is None."""
    a: list = [None] * n
    for r in range(1, n):
        bit = r & -r
        up = (r ^ bit) | (bit << 1)
        a[r] = up if up < n else r ^ bit
    inner = [r for r in range(n) if r not in a]  # A's leaves: B's inner places, first
    ranks = inner + [r for r in range(n) if r in a]  # heap place -> rank
    b: list = [None] * n
    for q in range(1, n):
        b[ranks[q]] = ranks[(q - 1) // 2]
    return tuple(a), tuple(b)


def children(parents: tuple, rank: int) -> list[int]:
    return [r for r, p in enumerate(parents) if p == rank]


def all_reduce(g: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, seq: int) -> None:
    """Afterwards every rank holds op over the group, bit-identical (each half comes from one root)."""
    both = trees(g.size)
    up = g.flows((r, p) for t in both for r, p in enumerate(t) if p is not None)
    flows = up + tuple((d, s) for s, d in up)
    halves = split(buf.size, 2)
    plan = []  # per tree: parent, children, pieces of its half
    for t, parents in enumerate(both):
        a, b = halves[t]
        num = min(MAX_PIECES, max(1, -(-(b - a) * buf.itemsize // PIPELINE_BYTES)), max(1, b - a))
        plan.append((t, parents[g.rank], children(parents, g.rank), [(a + s, a + e) for s, e in split(b - a, num)]))
    # up: first the tree where this rank is a leaf (a send that waits for nothing), so that no rank's
    # receive in one tree holds back what it owes the other; down: first the tree where it forwards
    plan.sort(key=lambda p: (len(p[2]) > 0, p[0]))
    pending = Pending()
    for i in range(max(len(p[3]) for p in plan)):
        for t, parent, kids, pieces in plan:  # up: reduce the children's piece i, pass it on
            if i < len(pieces):
                s, e = pieces[i]
                for child in kids:
                    g.recv_reduce(child, g.tag(seq, t, 0, i), buf[s:e], op, dtype)
                if parent is not None:
                    pending.add((t, i), g.send(parent, g.tag(seq, t, 0, i), buf[s:e], flows))
        for t, parent, kids, pieces in reversed(plan):  # down: take the result of piece i, hand it down
            if i < len(pieces):
                s, e = pieces[i]
                if parent is not None:
                    pending.settle((t, i))
                    g.recv_into(parent, g.tag(seq, t, 1, i), buf[s:e], dtype)
                for child in kids:
                    pending.add((t, i, child), g.send(child, g.tag(seq, t, 1, i), buf[s:e], flows))
    pending.settle_all()
