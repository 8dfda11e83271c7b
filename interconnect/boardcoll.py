"""Small collectives of real cards through the board: each payload published once, read in place.

Through messages, a one-shot all_reduce or all_gather of a few KiB costs every
card n - 1 sends and n - 1 receives (headers packed, checked and filed). Here
every card writes its entry state (clock, tx_free, rx_free, whether it has a
degraded link) and its payload once on its board (``interconnect.board``) and
reads its peers' payloads in place. The reduction runs in group-rank order as
one-shot's does (``oneshot._reduce_in_order``), so every card ends with the
bits the messages would give; the emulated clock comes from the simulation of
the same call from the exchanged entry states (``interconnect.sim``), which is
what the call's messages give, as on phantom cards. The simulation does not
model degraded links, so if any member has one, every member runs the call
through messages instead: the decision is taken from the exchanged states, the
same on every card.
"""
from __future__ import annotations

import numpy as np

from interconnect import auto, sim
from interconnect import reduce as red
from interconnect.group import ProcessGroup, split
from interconnect.reduce import ReduceOp


def _board(group: ProcessGroup, kind: str, algo_bytes: int, nbytes: int, algo: str):
    """The card's board if the call may run on it (the same answer on every member), else None."""
    fabric = group.fabric
    rings = getattr(fabric, "rings", None)  # the simulation's fabric has none
    if (rings is None or not rings.active or fabric.phantom or fabric.slowdown or group.size < 2 or not nbytes
            or not rings.board.can_publish(group.gid, 4, nbytes)):
        return None
    if algo == "auto":
        algo = auto.choose(kind, algo_bytes, group.ranks, fabric.ports.topology)
    return rings.board if algo == "one-shot" else None


def _exchange(board, group: ProcessGroup, data: np.ndarray):
    """(entry states, payload views) of every member, or None if a member has a degraded link."""
    fabric = group.fabric
    ports = fabric.ports
    got = board.exchange_data(group.ranks, group.gid, fabric.epoch, group.begin(),
                              [fabric.clock.now, ports.tx_free, ports.rx_free, int(bool(ports.degraded))],
                              data.view(np.uint8).reshape(-1))
    if any(values[3] for values, _ in got):
        return None
    return [values[:3] for values, _ in got], [view for _, view in got]


def _advance(group: ProcessGroup, call: sim.Call, states: list) -> None:
    fabric = group.fabric
    ports = fabric.ports
    fabric.board_calls += 1
    now, tx, rx = sim.CACHE.run(call, group.ranks, ports.topology, ports.reduce_ns, states)[group.rank]
    fabric.clock.now = now
    if tx is not None:
        ports.tx_free = tx
    if rx is not None:
        ports.rx_free = rx


def all_reduce(group: ProcessGroup, buf: np.ndarray, op: ReduceOp, dtype: str, algo: str) -> bool:
    """Run the all_reduce on the board and return True, or return False (nothing done)."""
    board = _board(group, "all_reduce", buf.nbytes, buf.nbytes, algo)
    if board is None:
        return False
    got = _exchange(board, group, buf)
    if got is None:
        return False
    states, views = got
    acc = np.empty_like(buf)
    for r, view in enumerate(views):
        x = buf if r == group.rank else view.view(buf.dtype)
        if r == 0:
            acc[...] = x
        else:
            red.reduce_into(acc, x, op, dtype)
    buf[...] = acc
    _advance(group, sim.Call("all_reduce", buf.size, dtype, algo, op.name.lower()), states)
    group.fabric.bytes_sent += (group.size - 1) * buf.nbytes
    return True


def all_gather(group: ProcessGroup, output: np.ndarray, input: np.ndarray, dtype: str, algo: str) -> bool:
    """Run the all_gather on the board and return True, or return False (nothing done)."""
    board = _board(group, "all_gather", output.nbytes, input.nbytes, algo)
    if board is None:
        return False
    got = _exchange(board, group, input)
    if got is None:
        return False
    states, views = got
    for r, (a, b) in enumerate(split(output.size, group.size)):
        output[a:b] = input if r == group.rank else views[r].view(output.dtype)
    _advance(group, sim.Call("all_gather", input.size, dtype, algo), states)
    group.fabric.bytes_sent += (group.size - 1) * input.nbytes
    return True
