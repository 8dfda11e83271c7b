"""Process groups: the cards a collective runs over, and the helpers algorithms share."""
from __future__ import annotations

import zlib

import numpy as np

from interconnect import reduce as red
from interconnect.fabric import Fabric, Message


class ProcessGroup:
    """A set of cards (global ranks, in group-rank order) that run collectives together.

    Every member must call the same collectives in the same order: each call
    takes the next sequence number, which is part of every message tag.
    """

    def __init__(self, fabric: Fabric, ranks: list[int]):
        ranks = [int(r) for r in ranks]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"group ranks must be distinct, got {ranks}")
        if fabric.rank not in ranks:
            raise ValueError(f"card {fabric.rank} is not in group {ranks}")
        self.fabric = fabric
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = ranks.index(fabric.rank)
        self.gid = zlib.crc32(np.asarray(ranks, np.int64).tobytes())
        self.seq = 0
        self.phantom = fabric.phantom
        self._flows: dict = {}

    def all_pairs(self) -> tuple:
        """Every ordered (src, dst) card pair of the group: the flows of a one-shot call."""
        got = self._flows.get("all")
        if got is None:
            got = self._flows["all"] = self.flows((a, b) for a in range(self.size)
                                                  for b in range(self.size) if a != b)
        return got

    def begin(self) -> int:
        self.seq += 1
        return self.seq

    def tag(self, seq: int, *parts: int) -> tuple:
        """(fabric epoch, group id, call number, ...): a message of a call broken off before the
        last resynchronisation never matches a later call (``Fabric.reset``)."""
        return (self.fabric.epoch, self.gid, seq, *parts)

    def card(self, group_rank: int) -> int:
        return self.ranks[group_rank % self.size]

    def flows(self, pairs) -> tuple:
        """Global (src, dst) card pairs of group-rank pairs: one step's concurrent flows."""
        return tuple((self.card(a), self.card(b)) for a, b in pairs)

    def ring_flows(self) -> tuple:
        return self.flows((i, i + 1) for i in range(self.size)) if self.size > 1 else ()

    def exchange(self, seq: int, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` in group order (an all-gather of a few ints outside the emulated
        clock: what phantom collectives need to simulate themselves)."""
        rings = self.fabric.rings
        if rings is not None and rings.active and rings.board.can_publish(self.gid, len(values)):
            return rings.board.exchange(self.ranks, self.gid, self.fabric.epoch, seq, values)
        tag = self.tag(seq, -1)
        for r in range(self.size):
            if r != self.rank:
                self.fabric.post(self.card(r), tag, values)
        return [list(values) if r == self.rank else self.fabric.take(self.card(r), tag) for r in range(self.size)]

    # -- data helpers shared by the algorithms ------------------------------------
    def empty(self, count: int, np_dtype) -> np.ndarray:
        """A scratch buffer, registered with the fabric window when there is room (zero-copy sends)."""
        window = self.fabric.window
        if window is not None and not self.phantom:
            try:
                return window.empty(count, np_dtype)
            except MemoryError:
                pass
        return np.empty(count, np_dtype)

    def release(self, arr: np.ndarray) -> None:
        if self.fabric.window is not None:
            self.fabric.window.release(arr)

    def copy(self, arr: np.ndarray) -> np.ndarray:
        out = self.empty(arr.size, arr.dtype)
        if not self.phantom:  # a phantom buffer holds nothing worth copying
            out[...] = arr
        return out

    def send(self, peer: int, tag: tuple, data: np.ndarray, flows: tuple = ()):
        return self.fabric.isend(self.card(peer), tag, data, data.nbytes, flows)

    def recv_into(self, peer: int, tag: tuple, out: np.ndarray, dtype: str) -> None:
        msg = self.fabric.recv(self.card(peer), tag)
        if not self.phantom:
            out[...] = _payload(msg, dtype, out.size)
        self.fabric.done(msg)

    def recv_reduce(self, peer: int, tag: tuple, acc: np.ndarray, op: red.ReduceOp, dtype: str) -> None:
        msg = self.fabric.recv(self.card(peer), tag, reduce=True)
        if not self.phantom:
            red.reduce_into(acc, _payload(msg, dtype, acc.size), op, dtype)
        self.fabric.done(msg)


def _payload(msg: Message, dtype: str, count: int) -> np.ndarray:
    arr = msg.array(dtype)
    if arr.size != count:
        raise ValueError(f"message from card {msg.src} has {arr.size} elements, expected {count}")
    return arr


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of ``parts`` nearly equal pieces of ``count`` (the first ones one longer)."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class Pending:
    """Sends in flight per buffer region: wait before overwriting what ZeroMQ may still read."""

    def __init__(self):
        self._by_key: dict = {}

    def add(self, key, handle) -> None:
        self._by_key.setdefault(key, []).append(handle)

    def settle(self, key) -> None:
        for h in self._by_key.pop(key, ()):
            h.wait()

    def settle_all(self) -> None:
        for key in list(self._by_key):
            self.settle(key)
