"""Ring algorithms: bandwidth-optimal, 2(n-1) latency terms for all-reduce.

A ring is an order of the group's ranks: the rank at place p sends to the
rank at place p+1 and receives from the one at place p-1 at every step. With
several channels (as NCCL's), every chunk of the buffer is split over the
channels and channel c runs its own ring, in its own order, on its share; the
channels' steps interleave, so that rings over different links move their
shares at once. ``RingSet`` holds the orders; ``DEFAULT`` is one channel in
group-rank order. Chunk k of a buffer is piece k of ``split(count, n)``;
buffers are flat arrays in storage dtype, and every routine leaves them alone
until the sends that read them are done. Broadcast and reduce are one chain
in group-rank order whatever the rings: channels whose chains meet the cards
in different orders would wait on each other at every card.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from interconnect.group import Pending, ProcessGroup, split
from interconnect.reduce import ReduceOp

PIPELINE_BYTES = 1 << 20  # piece size of chained (broadcast, reduce) transfers


@dataclass(frozen=True, slots=True)
class RingSet:
    """Ring orders, one per channel; ``None`` is one channel in group-rank order."""
    orders: tuple[tuple[int, ...], ...] | None = None

    def channels(self, n: int) -> list[tuple[int, ...]]:
        orders = self.orders or (tuple(range(n)),)
        for order in orders:
            if sorted(order) != list(range(n)):
                raise ValueError(f"ring order {' '.join(map(str, order))} is not an order of the {n} group ranks")
        return list(orders)


DEFAULT = RingSet()


class _Channel:
    """One ring: this rank's place in it, its neighbours, and its share of every chunk."""

    def __init__(self, g: ProcessGroup, order: tuple[int, ...], c: int, num: int, count: int):
        n = g.size
        self.c, self.order = c, order
        self.pos = order.index(g.rank)
        self.next, self.prev = order[(self.pos + 1) % n], order[(self.pos - 1) % n]
        # place q of the ring works on chunk order[q]; the channel takes share c of every chunk
        chunks = split(count, n)
        self.pieces = []
        for q in range(n):
            a, b = chunks[order[q]]
            s, e = split(b - a, num)[c]
            self.pieces.append((a + s, a + e))


def _channels(g: ProcessGroup, rings: RingSet, count: int) -> tuple[list[_Channel], tuple]:
    orders = rings.channels(g.size)
    chans = [_Channel(g, order, c, len(orders), count) for c, order in enumerate(orders)]
    flows = g.flows(pair for order in orders for pair in zip(order, order[1:] + order[:1]))
    return chans, flows


def _tag(g: ProcessGroup, seq: int, phase: int, step: int, c: int) -> tuple:
    return g.tag(seq, phase, step) if c == 0 else g.tag(seq, phase, step, c)


def _reduce_scatter_steps(g: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, seq: int,
                          shift: int, pending: Pending, rings: RingSet) -> None:
    """n-1 steps; afterwards place (p + 1 + shift) mod n's piece of every channel is fully reduced."""
    n = g.size
    chans, flows = _channels(g, rings, buf.size)
    for s in range(n - 1):
        for ch in chans:
            k = (ch.pos - s + shift) % n
            a, b = ch.pieces[k]
            pending.add((ch.c, k), g.send(ch.next, _tag(g, seq, 0, s, ch.c), buf[a:b], flows))
        for ch in chans:
            k = (ch.pos - s - 1 + shift) % n
            a, b = ch.pieces[k]
            pending.settle((ch.c, k))
            g.recv_reduce(ch.prev, _tag(g, seq, 0, s, ch.c), buf[a:b], op, dtype)


def _all_gather_steps(g: ProcessGroup, buf: np.ndarray, dtype: str, seq: int, owned: int,
                      pending: Pending, rings: RingSet) -> None:
    """n-1 steps; place p starts owning piece ``owned + p``; afterwards every piece is everywhere."""
    n = g.size
    chans, flows = _channels(g, rings, buf.size)
    for s in range(n - 1):
        for ch in chans:
            k = (ch.pos + owned - s) % n
            a, b = ch.pieces[k]
            pending.add((ch.c, k), g.send(ch.next, _tag(g, seq, 1, s, ch.c), buf[a:b], flows))
        for ch in chans:
            k = (ch.pos + owned - s - 1) % n
            a, b = ch.pieces[k]
            pending.settle((ch.c, k))
            g.recv_into(ch.prev, _tag(g, seq, 1, s, ch.c), buf[a:b], dtype)


def all_reduce(g: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, seq: int,
               rings: RingSet = DEFAULT) -> None:
    pending = Pending()
    _reduce_scatter_steps(g, buf, op, dtype, seq, 0, pending, rings)
    _all_gather_steps(g, buf, dtype, seq, 1, pending, rings)
    pending.settle_all()


def all_gather(g: ProcessGroup, out: np.ndarray, dtype: str, seq: int, rings: RingSet = DEFAULT) -> None:
    """``out`` holds this rank's piece at slot r on entry, every piece on return."""
    pending = Pending()
    _all_gather_steps(g, out, dtype, seq, 0, pending, rings)
    pending.settle_all()


def reduce_scatter(g: ProcessGroup, work: np.ndarray, op: ReduceOp, dtype: str, seq: int,
                   rings: RingSet = DEFAULT) -> None:
    """``work`` is a private copy of the input; on return its chunk r is reduced."""
    pending = Pending()
    _reduce_scatter_steps(g, work, op, dtype, seq, -1, pending, rings)
    pending.settle_all()


def _pieces(buf: np.ndarray) -> list[tuple[int, int]]:
    num = max(1, -(-buf.nbytes // PIPELINE_BYTES))
    return split(buf.size, min(num, max(1, buf.size)))


def broadcast(g: ProcessGroup, buf: np.ndarray, src: int, dtype: str, seq: int) -> None:
    """A chain src -> src+1 -> ... , pipelined in PIPELINE_BYTES pieces."""
    n = g.size
    pos = (g.rank - src) % n  # place in the chain
    flows = g.flows((src + i, src + i + 1) for i in range(n - 1))
    pending = Pending()
    for i, (a, b) in enumerate(_pieces(buf)):
        if pos > 0:
            g.recv_into(g.rank - 1, g.tag(seq, 2, i), buf[a:b], dtype)
        if pos < n - 1:
            pending.add(i, g.send(g.rank + 1, g.tag(seq, 2, i), buf[a:b], flows))
    pending.settle_all()


def reduce(g: ProcessGroup, work: np.ndarray, dst: int, op: ReduceOp, dtype: str, seq: int) -> None:
    """A chain dst+1 -> dst+2 -> ... -> dst, pipelined; ``work`` is a private copy, reduced at dst."""
    n = g.size
    pos = (g.rank - dst - 1) % n  # 0 starts the chain, n-1 is dst
    flows = g.flows((dst + 1 + i, dst + 2 + i) for i in range(n - 1))
    pending = Pending()
    for i, (a, b) in enumerate(_pieces(work)):
        if pos > 0:
            g.recv_reduce(g.rank - 1, g.tag(seq, 3, i), work[a:b], op, dtype)
        if pos < n - 1:
            pending.add(i, g.send(g.rank + 1, g.tag(seq, 3, i), work[a:b], flows))
    pending.settle_all()
