"""Ring algorithms: bandwidth-optimal, 2(n-1) latency terms for all-reduce.

Group rank r sends to r+1 and receives from r-1 at every step. Chunk k of a
buffer is piece k of ``split(count, n)``. Buffers are flat arrays in storage
dtype; every routine leaves them alone until the sends that read them are done.
"""
from __future__ import annotations

import numpy as np

from interconnect.group import Pending, ProcessGroup, split
from interconnect.reduce import ReduceOp

PIPELINE_BYTES = 1 << 20  # piece size of chained (broadcast, reduce) transfers


def _reduce_scatter_steps(g: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, seq: int,
                          shift: int, pending: Pending) -> None:
    """n-1 steps; afterwards chunk (r + 1 + shift) mod n of ``buf`` holds the full reduction."""
    n, r = g.size, g.rank
    chunks = split(buf.size, n)
    flows = g.ring_flows()
    for s in range(n - 1):
        k_send = (r - s + shift) % n
        k_recv = (r - s - 1 + shift) % n
        a, b = chunks[k_send]
        pending.add(k_send, g.send(r + 1, g.tag(seq, 0, s), buf[a:b], flows))
        a, b = chunks[k_recv]
        pending.settle(k_recv)
        g.recv_reduce(r - 1, g.tag(seq, 0, s), buf[a:b], op, dtype)


def _all_gather_steps(g: ProcessGroup, buf: np.ndarray, dtype: str, seq: int, owned: int,
                      pending: Pending) -> None:
    """n-1 steps; rank r starts owning chunk ``owned + r``; afterwards every chunk is everywhere."""
    n, r = g.size, g.rank
    chunks = split(buf.size, n)
    flows = g.ring_flows()
    for s in range(n - 1):
        k_send = (r + owned - s) % n
        k_recv = (r + owned - s - 1) % n
        a, b = chunks[k_send]
        pending.add(k_send, g.send(r + 1, g.tag(seq, 1, s), buf[a:b], flows))
        a, b = chunks[k_recv]
        pending.settle(k_recv)
        g.recv_into(r - 1, g.tag(seq, 1, s), buf[a:b], dtype)


def all_reduce(g: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, seq: int) -> None:
    pending = Pending()
    _reduce_scatter_steps(g, buf, op, dtype, seq, 0, pending)
    _all_gather_steps(g, buf, dtype, seq, 1, pending)
    pending.settle_all()


def all_gather(g: ProcessGroup, out: np.ndarray, dtype: str, seq: int) -> None:
    """``out`` holds this rank's piece at slot r on entry, every piece on return."""
    pending = Pending()
    _all_gather_steps(g, out, dtype, seq, 0, pending)
    pending.settle_all()


def reduce_scatter(g: ProcessGroup, work: np.ndarray, op: ReduceOp, dtype: str, seq: int) -> None:
    """``work`` is a private copy of the input; on return its chunk r is reduced."""
    pending = Pending()
    _reduce_scatter_steps(g, work, op, dtype, seq, -1, pending)
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
