"""Collectives on the emulated clock alone: every rank of a group run in one process.

Each rank runs the very algorithm code the cards run (``collectives.run_collective``),
in its own greenlet, over a ``SimFabric``: sends are stamped by the same port
clock (``emulation.PortClock``) and posted to an in-process mailbox; a receive
waits (switches to the other ranks) until its message is there, then moves the
clock exactly as the card's fabric does. No byte moves. The emulated result is
therefore the cards' result by construction, and it does not depend on the order
the ranks happen to run in.

Phantom cards use it so that a collective costs one exchange of entry states
instead of every message of the algorithm (``emulate``), and the serving replay
uses it to run whole instances without card processes.

A simulation depends only on the entry states relative to the earliest clock,
so results are cached on that key: tensor-parallel steps repeat the same
collectives with the same offsets layer after layer.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import greenlet
import numpy as np

from interconnect import wire
from interconnect.emulation import PortClock


class SimDeadlock(RuntimeError):
    """Every simulated rank waits for a message no rank will send."""


@dataclass(slots=True)
class SimMessage:
    src: int
    tag: tuple
    nbytes: int
    stamp: dict
    data: None = None
    shm: None = None
    meta: list | None = None


class _Done:
    __slots__ = ()

    def wait(self) -> None:
        pass


_DONE = _Done()


class _World:
    """The mailboxes of one simulation and the hub greenlet that schedules the ranks."""

    def __init__(self):
        self.boxes: dict[tuple, deque] = {}
        self.hub = greenlet.getcurrent()
        self.posts = 0

    def post(self, dst: int, msg: SimMessage) -> None:
        self.boxes.setdefault((dst, msg.src, msg.tag), deque()).append(msg)
        self.posts += 1

    def take(self, dst: int, src: int, tag: tuple) -> SimMessage:
        key = (dst, src, tag)
        while not self.boxes.get(key):
            self.hub.switch()
        box = self.boxes[key]
        msg = box.popleft()
        if not box:
            del self.boxes[key]
        return msg

    def run(self, fns) -> None:
        """Run every fn in its own greenlet until all have returned."""
        self.hub = greenlet.getcurrent()
        active = [greenlet.greenlet(fn) for fn in fns]
        while active:
            before, n_before = self.posts, len(active)
            for g in list(active):
                g.switch()
                if g.dead:
                    active.remove(g)
            if active and self.posts == before and len(active) == n_before:
                raise SimDeadlock(f"{len(active)} simulated ranks wait for messages nobody sends")


class SimFabric:
    """What the collective algorithms use of a card's ``Fabric``, for one simulated rank."""

    phantom = True
    window = None
    epoch = 0

    def __init__(self, world: _World, rank: int, clock, ports: PortClock, *, emulate_only: bool = False):
        """``emulate_only``: collectives exchange entry states and use the cached simulation, as phantom
        cards do (``collectives._emulated``); otherwise they send every message of the algorithm."""
        self.world, self.rank, self.clock, self.ports = world, rank, clock, ports
        self.emulate_only = emulate_only
        self.touched_tx = self.touched_rx = False

    def post(self, dst: int, tag: tuple, meta: list[int]) -> None:
        self.world.post(dst, SimMessage(self.rank, tuple(tag), 0, {}, meta=list(meta)))

    def take(self, src: int, tag: tuple) -> list[int]:
        return self.world.take(self.rank, src, tuple(tag)).meta

    def isend(self, dst: int, tag: tuple, payload, nbytes: int | None = None, flows: tuple = ()):
        nbytes = int(payload.nbytes if nbytes is None else nbytes)
        stamp = self.ports.depart(self.clock.now, dst, nbytes, flows)
        self.touched_tx = True
        self.world.post(dst, SimMessage(self.rank, tuple(tag), nbytes, stamp))
        return _DONE

    def recv(self, src: int, tag: tuple, *, reduce: bool = False) -> SimMessage:
        msg = self.world.take(self.rank, src, tuple(tag))
        self.clock.now, _ = self.ports.receive(self.clock.now, msg.stamp, msg.nbytes, reduce)
        self.touched_rx = True
        return msg

    def done(self, msg) -> None:
        pass


class _Clock:
    __slots__ = ("now",)

    def __init__(self, now: int):
        self.now = now


@dataclass(frozen=True, slots=True)
class Call:
    """One collective call as ``collectives.run_collective`` takes it (data: ``count`` elements)."""
    kind: str
    count: int
    dtype: str
    algo: str
    redop: str = "sum"
    root: int = 0


def simulate(call: Call, cards: list[int], topology, reduce_ns, states: list[tuple[int, int, int]]):
    """Run ``call`` over ``cards`` from entry ``states`` (clock, tx_free, rx_free) per rank;
    returns each rank's (clock, tx_free or None, rx_free or None) after it, None where the
    call left that port alone."""
    if call.kind in ONE_SHOT and len(cards) > 1 and call.count and _algo_name(call, cards, topology) == "one-shot":
        return one_shot(call, cards, topology, reduce_ns, states)
    return simulate_messages(call, cards, topology, reduce_ns, states)


ONE_SHOT = ("all_reduce", "all_gather")


def _algo_name(call: Call, cards: list[int], topology) -> str:
    """The algorithm the call runs (``auto`` resolved as ``collectives`` resolves it: on the whole buffer)."""
    from interconnect import auto

    nbytes = call.count * wire.itemsize(call.dtype) * (len(cards) if call.kind == "all_gather" else 1)
    return auto.resolve(call.algo, call.kind, nbytes, cards, topology)


def one_shot(call: Call, cards: list[int], topology, reduce_ns, states: list[tuple[int, int, int]]):
    """``simulate`` of a one-shot all_reduce or all_gather without running the algorithm: the port
    operations of ``interconnect.oneshot`` in its order. Every rank sends its whole buffer (all_gather:
    its piece) to each other rank in rank order, then takes the others' in rank order; an all_reduce
    reduces each message after the first of rank 0's ordering into the accumulator (``_reduce_in_order``).
    Tested equal to ``simulate_messages`` from skewed states."""
    n = len(cards)
    nbytes = call.count * wire.itemsize(call.dtype)
    flows = tuple((a, b) for a in cards for b in cards if a != b)  # ProcessGroup.all_pairs
    ports, clocks = [], []
    for card, (clock, tx, rx) in zip(cards, states):
        p = PortClock(topology, card, reduce_ns)
        p.tx_free, p.rx_free = tx, rx
        ports.append(p)
        clocks.append(clock)
    stamps = [[ports[r].depart(clocks[r], cards[d], nbytes, flows) if d != r else None for d in range(n)]
              for r in range(n)]
    reduce = call.kind == "all_reduce"
    out = []
    for r in range(n):
        now = clocks[r]
        for src in range(n):
            if src != r:  # rank 0's part starts the accumulator; later parts are reduced into it
                now, _ = ports[r].receive(now, stamps[src][r], nbytes, reduce and src != 0)
        out.append((now, ports[r].tx_free, ports[r].rx_free))
    return out


def simulate_messages(call: Call, cards: list[int], topology, reduce_ns, states: list[tuple[int, int, int]]):
    """``simulate`` by running the collective's own code for every rank over in-process mailboxes."""
    from interconnect.collectives import run_collective
    from interconnect.group import ProcessGroup

    world = _World()
    fabrics = []
    for card, (clock, tx, rx) in zip(cards, states):
        ports = PortClock(topology, card, reduce_ns)
        ports.tx_free, ports.rx_free = tx, rx
        fabrics.append(SimFabric(world, card, _Clock(clock), ports))
    np_dtype = wire.DTYPES[wire.check_dtype(call.dtype)][0]

    def rank_fn(fabric):
        def fn():
            g = ProcessGroup(fabric, cards)
            run_collective(call.kind, g, np.empty(call.count, np_dtype), call.dtype, call.algo, call.redop,
                           call.root)
        return fn

    world.run([rank_fn(f) for f in fabrics])
    return [(f.clock.now, f.ports.tx_free if f.touched_tx else None, f.ports.rx_free if f.touched_rx else None)
            for f in fabrics]


class SimCache:
    """``simulate`` keyed on entry states relative to the earliest clock (exact: see ``normalise``)."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self._store: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def run(self, call: Call, cards: list[int], topology, reduce_ns, states: list[tuple[int, int, int]]):
        base, rel = normalise(states)
        key = (call, tuple(cards), topology, reduce_ns, rel)
        out = self._store.get(key)
        if out is None:
            self.misses += 1
            out = simulate(call, cards, topology, reduce_ns, [(base + c, base + t, base + r) for c, t, r in rel])
            out = [(c - base, None if t is None else t - base, None if r is None else r - base) for c, t, r in out]
            self._store[key] = out
            if len(self._store) > self.maxsize:
                self._store.popitem(last=False)
        else:
            self.hits += 1
            self._store.move_to_end(key)
        return [(c + base, None if t is None else t + base, None if r is None else r + base) for c, t, r in out]


def normalise(states: list[tuple[int, int, int]]) -> tuple[int, tuple]:
    """(base, states relative to it) with every port time that cannot matter raised to where it stops
    mattering: a send starts at max(clock, tx_free), so tx_free below the rank's clock is its clock;
    an arrival is max(start + lat + occ, rx_free + occ) with start >= the earliest clock, so rx_free
    below that is the earliest clock. The result of a call is the same for both."""
    base = min(c for c, _, _ in states)
    return base, tuple((c - base, max(t, c) - base, max(r, base) - base) for c, t, r in states)


CACHE = SimCache()
