"""One-shot (direct) algorithms: every rank sends straight to every rank that needs its data.

One latency term and (n-1) messages queued on each card's send port: the
fastest for small messages on a switch where every card reaches every other
in one hop. Reductions run in group-rank order on every rank, so all ranks
compute bit-identical results.
"""
from __future__ import annotations

import numpy as np

from interconnect import reduce as red
from interconnect.group import Pending, ProcessGroup, split
from interconnect.reduce import ReduceOp


def _all_pairs(g: ProcessGroup) -> tuple:
    return g.all_pairs()


def _reduce_in_order(g: ProcessGroup, mine: np.ndarray, acc: np.ndarray, tag_of, op: ReduceOp,
                     dtype: str) -> None:
    """acc = op over ranks 0..n-1 in that order, taking this rank's part from ``mine``."""
    first = True
    for r in range(g.size):
        if r == g.rank:
            if g.phantom:  # phantom buffers stay untouched
                pass
            elif first:
                acc[...] = mine
            else:
                red.reduce_into(acc, mine, op, dtype)
        elif first:
            g.recv_into(r, tag_of(r), acc, dtype)
        else:
            g.recv_reduce(r, tag_of(r), acc, op, dtype)
        first = False


def all_reduce(g: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, seq: int) -> None:
    flows = _all_pairs(g)
    pending = Pending()
    for r in range(g.size):
        if r != g.rank:
            pending.add(r, g.send(r, g.tag(seq, 0, g.rank), buf, flows))
    acc = np.empty_like(buf)  # never sent: no need for a registered buffer
    _reduce_in_order(g, buf, acc, lambda r: g.tag(seq, 0, r), op, dtype)
    pending.settle_all()
    if not g.phantom:
        buf[...] = acc


def all_gather(g: ProcessGroup, out: np.ndarray, dtype: str, seq: int) -> None:
    chunks = split(out.size, g.size)
    a, b = chunks[g.rank]
    flows = _all_pairs(g)
    pending = Pending()
    for r in range(g.size):
        if r != g.rank:
            pending.add(r, g.send(r, g.tag(seq, 0, g.rank), out[a:b], flows))
    for r in range(g.size):
        if r != g.rank:
            ra, rb = chunks[r]
            g.recv_into(r, g.tag(seq, 0, r), out[ra:rb], dtype)
    pending.settle_all()


def reduce_scatter(g: ProcessGroup, work: np.ndarray, op: ReduceOp, dtype: str, seq: int) -> None:
    chunks = split(work.size, g.size)
    flows = _all_pairs(g)
    pending = Pending()
    for r in range(g.size):
        if r != g.rank:
            a, b = chunks[r]
            pending.add(r, g.send(r, g.tag(seq, 0, g.rank), work[a:b], flows))
    a, b = chunks[g.rank]
    mine = work[a:b] if g.phantom else work[a:b].copy()
    _reduce_in_order(g, mine, work[a:b], lambda r: g.tag(seq, 0, r), op, dtype)
    pending.settle_all()


def broadcast(g: ProcessGroup, buf: np.ndarray, src: int, dtype: str, seq: int) -> None:
    if g.rank == src:
        flows = g.flows((src, r) for r in range(g.size) if r != src)
        pending = Pending()
        for r in range(g.size):
            if r != src:
                pending.add(r, g.send(r, g.tag(seq, 0), buf, flows))
        pending.settle_all()
    else:
        g.recv_into(src, g.tag(seq, 0), buf, dtype)


def reduce(g: ProcessGroup, work: np.ndarray, dst: int, op: ReduceOp, dtype: str, seq: int) -> None:
    if g.rank != dst:
        g.send(dst, g.tag(seq, 0, g.rank), work, g.flows((r, dst) for r in range(g.size) if r != dst)).wait()
        return
    mine = work if g.phantom else work.copy()
    _reduce_in_order(g, mine, work, lambda r: g.tag(seq, 0, r), op, dtype)
