"""Collectives over a process group, named and shaped as torch.distributed's.

Tensors are flat numpy arrays in wire storage dtype (bfloat16 as uint16),
named by a dtype string. Every call is synchronous: on return the result is
in place and every buffer may be reused (the fabric's sends are settled).
``algo`` is ``"ring"``, ``"tree"``, ``"one-shot"``, ``"dbtree"`` (all_reduce
only), ``"auto"`` (``interconnect.auto``), or ``"ring:SPEC"`` for rings that are
given, default or searched (``interconnect.ring_search``).
"""
from __future__ import annotations

import os

import numpy as np

from interconnect import auto, dbtree, oneshot, ring, ring_search, sim, tree
from interconnect import reduce as red
from interconnect.group import ProcessGroup, split
from interconnect.reduce import ReduceOp
from interconnect.shmring import BOARD_DATA_BYTES

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce")
ALGORITHMS = {"ring": ring, "tree": tree, "one-shot": oneshot, "dbtree": dbtree}
ALGO_NAMES = (*ALGORITHMS, "auto")


def check_algo(algo: str) -> None:
    """Raise ValueError naming the problem unless ``algo`` names an algorithm."""
    if not isinstance(algo, str) or algo not in ALGO_NAMES and not algo.startswith(ring_search.PREFIX):
        raise ValueError(f"unknown algorithm {algo!r}; known: {', '.join(ALGO_NAMES)}, "
                         f"ring:default, ring:search, ring:ORDER|ORDER...")
    ring_search.check_name(algo)


def _algo(g: ProcessGroup, op: str, nbytes: int, algo: str):
    algo = auto.resolve(algo, op, nbytes, g.ranks, g.fabric.ports.topology)
    check_algo(algo)
    if algo.startswith(ring_search.PREFIX):
        return ring_search.algorithm(algo, g.ranks, g.fabric.ports.topology)
    if not hasattr(ALGORITHMS[algo], op):
        raise ValueError(f"algorithm {algo!r} has no {op}")
    return ALGORITHMS[algo]


def _emulated(kind: str, group: ProcessGroup, count: int, dtype: str, algo: str, redop="sum",
              root: int = 0) -> bool:
    """On phantom cards: advance this card's clock and ports by the simulated call and return True.

    The group's cards exchange their entry states (clock, send port, receive port) and each
    simulates the whole call (``interconnect.sim``), which gives what the call's messages would.
    """
    fabric = group.fabric
    if not getattr(fabric, "emulate_only", False):
        return False
    check_algo(algo)
    ports, clock = fabric.ports, fabric.clock
    seq = group.begin()
    states = group.exchange(seq, [clock.now, ports.tx_free, ports.rx_free])
    _advance(group, states, sim.Call(kind, count, dtype, algo, ReduceOp.parse(redop).name.lower(), root))
    return True


def _advance(group: ProcessGroup, states: list, call: sim.Call) -> None:
    """Move this card's clock and ports as ``call``, entered from every rank's ``states``, would."""
    ports = group.fabric.ports
    now, tx, rx = sim.CACHE.run(call, group.ranks, ports.topology, ports.reduce_ns, states)[group.rank]
    group.fabric.clock.now = now
    if tx is not None:
        ports.tx_free = tx
    if rx is not None:
        ports.rx_free = rx


# Small all_reduce and all_gather calls of real cards on one host go "on the board"
# (``interconnect.board``): every card publishes its entry state and its buffer once, reads its
# peers' buffers in place and computes the result itself, and its clock moves as the simulation
# of the call's messages says (the phantom cards' way, exact by construction). One publication
# per call instead of n - 1 messages out and n - 1 in. The data are the messages' data: an
# all_gather concatenates, and an all_reduce goes on the board only when its algorithm is
# one-shot, which reduces in group-rank order on every rank, as this does. A card with link
# faults or real-time shaping (their figures come from the messages themselves) says so in its
# entry, and then the whole group sends the call's messages. RSD_BOARD_DATA=0 turns it off (the
# cards inherit the host's environment, so they agree).
BOARD_DATA = os.environ.get("RSD_BOARD_DATA", "1") != "0"


def _on_board(kind: str, group: ProcessGroup, nbytes: int, algo: str) -> bool:
    """Whether this call tries the board: every rank of the group decides the same from the same inputs."""
    fabric = group.fabric
    rings = getattr(fabric, "rings", None)
    if not (BOARD_DATA and rings is not None and rings.active and not fabric.phantom and group.size > 1
            and 0 < nbytes <= BOARD_DATA_BYTES and rings.board.can_publish(group.gid, 4)):
        return False
    return kind != "all_reduce" or auto.resolve(algo, kind, nbytes, group.ranks, fabric.ports.topology) == "one-shot"


def _board_call(group: ProcessGroup, mine: np.ndarray, call: sim.Call):
    """Publish ``mine`` and the entry state; the group's buffers in rank order, or None (the group
    sends the call's messages: a member has link faults or shaping)."""
    fabric, ports = group.fabric, group.fabric.ports
    seq = group.begin()
    simulable = int(not ports.degraded and not fabric.slowdown)
    states = fabric.rings.board.exchange(group.ranks, group.gid, fabric.epoch, seq,
                                         [fabric.clock.now, ports.tx_free, ports.rx_free, simulable], mine)
    if not all(s[3] for s in states):
        group.seq -= 1  # the messages take this call's number
        return None
    _advance(group, [s[:3] for s in states], call)
    fabric.bytes_sent += (group.size - 1) * mine.nbytes  # what a one-shot call sends
    fabric.board_calls += 1
    board, nbytes = fabric.rings.board, mine.nbytes
    return [mine if c == fabric.rank else board.data(c, group.gid, nbytes).view(mine.dtype)
            for c in group.ranks]


def all_reduce(buf: np.ndarray, op=ReduceOp.SUM, group: ProcessGroup = None, *, dtype: str,
               algo: str = "auto") -> None:
    """Reduce ``buf`` over the group; afterwards every rank holds op(buf_0, ..., buf_{n-1}).

    rank 0: [1, 2]   rank 1: [3, 4]   ->   every rank: [4, 6]   (SUM)
    Every rank ends with bit-identical values.
    """
    op = ReduceOp.parse(op)
    red.check_op(op, dtype)
    if _emulated("all_reduce", group, buf.size, dtype, algo, op):
        return
    if _on_board("all_reduce", group, buf.nbytes, algo):
        bufs = _board_call(group, buf,
                           sim.Call("all_reduce", buf.size, dtype, algo, op.name.lower()))
        if bufs is not None:
            acc = bufs[0].copy()
            for other in bufs[1:]:
                red.reduce_into(acc, other, op, dtype)
            buf[...] = acc
            if op is ReduceOp.AVG:
                red.finish_avg(buf, group.size, dtype)
            return
    seq = group.begin()
    if group.size > 1 and buf.size:
        _algo(group, "all_reduce", buf.nbytes, algo).all_reduce(group, buf, op, dtype, seq)
    if op is ReduceOp.AVG and not group.phantom:
        red.finish_avg(buf, group.size, dtype)


def all_gather(output: np.ndarray, input: np.ndarray, group: ProcessGroup = None, *, dtype: str,
               algo: str = "auto") -> None:
    """Concatenate every rank's ``input`` in rank order into ``output`` (n times its size) on all ranks.

    rank 0: [1]   rank 1: [2]   ->   every rank: [1, 2]
    """
    n = group.size
    if output.size != n * input.size:
        raise ValueError(f"all_gather: output has {output.size} elements, needs {n} x {input.size}")
    if _emulated("all_gather", group, input.size, dtype, algo):
        return
    if _on_board("all_gather", group, input.nbytes, algo):
        bufs = _board_call(group, np.ascontiguousarray(input),
                           sim.Call("all_gather", input.size, dtype, algo))
        if bufs is not None:
            np.concatenate(bufs, out=output)
            return
    seq = group.begin()
    c = input.size
    if not group.phantom:  # phantom buffers stay untouched: they cost no memory
        output[group.rank * c:(group.rank + 1) * c] = input
    if n > 1 and c:
        _algo(group, "all_gather", output.nbytes, algo).all_gather(group, output, dtype, seq)


def reduce_scatter(output: np.ndarray, input: np.ndarray, op=ReduceOp.SUM, group: ProcessGroup = None, *,
                   dtype: str, algo: str = "auto") -> None:
    """Reduce ``input`` (n x output's size) over the group; rank r keeps piece r of the result.

    rank 0: [1, 2]   rank 1: [3, 4]   ->   rank 0: [4]   rank 1: [6]   (SUM)
    """
    op = ReduceOp.parse(op)
    red.check_op(op, dtype)
    n = group.size
    if input.size != n * output.size:
        raise ValueError(f"reduce_scatter: input has {input.size} elements, needs {n} x {output.size}")
    if _emulated("reduce_scatter", group, input.size, dtype, algo, op):
        return
    seq = group.begin()
    work = group.copy(input)
    try:
        if n > 1 and output.size:
            _algo(group, "reduce_scatter", input.nbytes, algo).reduce_scatter(group, work, op, dtype, seq)
        a, b = split(work.size, n)[group.rank]
        if not group.phantom:
            output[...] = work[a:b]
    finally:
        group.release(work)
    if op is ReduceOp.AVG and not group.phantom:
        red.finish_avg(output, n, dtype)


def broadcast(buf: np.ndarray, src: int, group: ProcessGroup = None, *, dtype: str, algo: str = "auto") -> None:
    """Copy group rank ``src``'s ``buf`` to every rank.

    src=0, rank 0: [7, 8]   ->   every rank: [7, 8]
    """
    _check_root(src, group)
    if _emulated("broadcast", group, buf.size, dtype, algo, root=src):
        return
    seq = group.begin()
    if group.size > 1 and buf.size:
        _algo(group, "broadcast", buf.nbytes, algo).broadcast(group, buf, src, dtype, seq)


def reduce(buf: np.ndarray, dst: int, op=ReduceOp.SUM, group: ProcessGroup = None, *, dtype: str,
           algo: str = "auto") -> None:
    """Reduce ``buf`` over the group into group rank ``dst``'s ``buf``; other ranks' buffers are unchanged.

    dst=1, rank 0: [1, 2]   rank 1: [3, 4]   ->   rank 1: [4, 6]   rank 0: [1, 2]
    """
    op = ReduceOp.parse(op)
    red.check_op(op, dtype)
    _check_root(dst, group)
    if _emulated("reduce", group, buf.size, dtype, algo, op, dst):
        return
    seq = group.begin()
    if group.size > 1 and buf.size:
        work = group.copy(buf)
        try:
            _algo(group, "reduce", buf.nbytes, algo).reduce(group, work, dst, op, dtype, seq)
            if group.rank == dst and not group.phantom:
                buf[...] = work
        finally:
            group.release(work)
    if op is ReduceOp.AVG and group.rank == dst and not group.phantom:
        red.finish_avg(buf, group.size, dtype)


def barrier(group: ProcessGroup = None) -> None:
    """Return on each rank only after every rank of the group has entered."""
    token = np.zeros(1, np.int32)
    all_reduce(token, ReduceOp.SUM, group, dtype="int32", algo="tree" if group.size > 2 else "one-shot")


def isend(buf: np.ndarray, dst: int, group: ProcessGroup = None, tag: int = 0):
    """Start sending ``buf`` to group rank ``dst``; ``buf`` may be reused once ``.wait()`` returns."""
    return group.send(dst, group.tag(0, 1 << 30, tag), buf)


def send(buf: np.ndarray, dst: int, group: ProcessGroup = None, tag: int = 0) -> None:
    """Send ``buf`` to group rank ``dst``; returns when ``buf`` may be reused."""
    isend(buf, dst, group, tag).wait()


class _RecvInto:
    def __init__(self, group, src, tag, buf, dtype):
        self.group, self.src, self.tag, self.buf, self.dtype = group, src, tag, buf, dtype

    def wait(self) -> np.ndarray:
        self.group.recv_into(self.src, self.tag, self.buf, self.dtype)
        return self.buf


def irecv(buf: np.ndarray, src: int, group: ProcessGroup = None, tag: int = 0, *, dtype: str) -> _RecvInto:
    """A receive into ``buf`` from group rank ``src``; ``buf`` holds the data once ``.wait()`` returns.

    Messages wait on the receiving card until asked for, so a late ``wait`` loses nothing.
    """
    return _RecvInto(group, src, group.tag(0, 1 << 30, tag), buf, dtype)


def recv(buf: np.ndarray, src: int, group: ProcessGroup = None, tag: int = 0, *, dtype: str) -> None:
    """Receive into ``buf`` what group rank ``src`` sent with the same ``tag``."""
    irecv(buf, src, group, tag, dtype=dtype).wait()


def _check_root(root: int, group: ProcessGroup) -> None:
    if not 0 <= root < group.size:
        raise ValueError(f"root {root} is not a rank of a group of {group.size}")


def out_count(kind: str, count: int, n: int) -> int:
    return count * n if kind == "all_gather" else count // n if kind == "reduce_scatter" else 0


def run_collective(kind: str, g: ProcessGroup, data: np.ndarray, dtype: str, algo: str, redop: str, root: int,
        peer: int = 0, tag: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Run ``kind`` on this card's ``data`` (modified in place where the collective is in place)."""
    if kind == "all_reduce":
        all_reduce(data, redop, g, dtype=dtype, algo=algo)
        return data
    if kind == "reduce_scatter" and data.size % g.size:
        raise ValueError(f"reduce_scatter: {data.size} elements do not split over {g.size} ranks")
    if kind in ("all_gather", "reduce_scatter") and out is None:
        out = np.empty(out_count(kind, data.size, g.size), data.dtype)
    if kind == "all_gather":
        all_gather(out, data, g, dtype=dtype, algo=algo)
        return out
    if kind == "reduce_scatter":
        reduce_scatter(out, data, redop, g, dtype=dtype, algo=algo)
        return out
    if kind == "broadcast":
        broadcast(data, root, g, dtype=dtype, algo=algo)
        return data
    if kind == "reduce":
        reduce(data, root, redop, g, dtype=dtype, algo=algo)
        return data
    if kind == "barrier":
        barrier(g)
        return data[:0]
    if kind == "exchange":  # non-blocking: post the receive and the send, then wait on both
        out = np.empty_like(data)
        incoming = irecv(out, (g.rank - 1) % g.size, g, tag, dtype=dtype)
        outgoing = isend(data, (g.rank + 1) % g.size, g, tag)
        incoming.wait()
        outgoing.wait()
        return out
    if kind == "send":
        send(data, peer, g, tag)
        return data[:0]
    if kind == "recv":
        recv(data, peer, g, tag, dtype=dtype)
        return data
    raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}, barrier, send, recv")
