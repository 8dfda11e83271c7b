"""Card-to-card point-to-point messaging over ZeroMQ, with the emulated clock.

Each card binds one PULL socket (``ipc://`` in the run's private directory, or
``tcp://`` on loopback) and connects one PUSH socket per peer it sends to. A
message is ``[header, payload?]``: the header names the sender and a tag and
carries the emulated stamp (``interconnect.emulation``). Receives are matched
on (source, tag); messages that arrive before they are asked for wait in a
table.

Payloads travel one of three ways, none of which changes the emulated clock:

* small (< ``copy_threshold``): copied into the socket message at once;
* large, with a shared-memory window (cards on one host): the header names a
  region of the sender's window; the receiver reads it in place and sends an
  acknowledgement (``interconnect.window``);
* large, without a window (tcp across hosts): handed to ZeroMQ without a copy
  and tracked.

Real-time shaping (``slowdown`` > 0, for demos and for testing behaviour under
slow links) delays each delivery until the wall clock has caught up with the
link model times ``slowdown``; it never changes the emulated clock.

Buffer reuse: ``SendHandle.wait()`` returns only when the sender may
overwrite the payload's buffer (ZeroMQ let go of it, or the receiver
acknowledged reading it from the window); overwriting earlier corrupts what
the peer receives.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq

from interconnect import auth, wire
from interconnect.emulation import PortClock
from interconnect.ringpath import RingPath
from interconnect.window import PeerWindows, Window, WindowFull

log = logging.getLogger("rsd.fabric")
# How long a waiting card polls before it sleeps; measured with bench/collectives.py on 2 cores
# (4 KiB all_reduce, 4 cards): 0 -> ~1.4 ms, 0.5 ms -> ~0.9 ms, 5 ms -> ~0.5 ms per call.
SPIN_S = float(os.environ.get("RSD_SPIN_S", "0.005"))


class FabricError(RuntimeError):
    pass


class FabricTimeout(FabricError):
    pass


class Clock:
    """A card's emulated clock, integer nanoseconds; shared by its fabric and its compute."""

    __slots__ = ("now",)

    def __init__(self, now: int = 0):
        self.now = now


@dataclass(slots=True)
class Message:
    src: int
    tag: tuple
    nbytes: int
    stamp: dict
    frame: zmq.Frame | None = None
    shm: tuple | None = None  # (offset, token) in the sender's window
    data: np.ndarray | None = None  # uint8 view of the payload
    sent: tuple | None = None  # (emulated, wall) time of sending, when real-time shaping is on
    meta: list | None = None  # a few ints of bookkeeping (``post``), outside the emulated clock

    def array(self, dtype: str) -> np.ndarray:
        """The payload as a flat read-only array in the storage dtype of ``dtype``."""
        np_dtype = wire.DTYPES[dtype][0]
        return np.empty(0, np_dtype) if self.data is None else self.data.view(np_dtype)


class SendHandle:
    __slots__ = ("fabric", "tracker", "token")

    def __init__(self, fabric=None, tracker=None, token=None):
        self.fabric, self.tracker, self.token = fabric, tracker, token

    def wait(self) -> None:
        if self.tracker is not None:
            self.tracker.wait()
        if self.token is not None:
            self.fabric._wait_ack(self.token)


class RecvHandle:
    __slots__ = ("fabric", "src", "tag", "reduce")

    def __init__(self, fabric, src, tag, reduce):
        self.fabric, self.src, self.tag, self.reduce = fabric, src, tag, reduce

    def wait(self) -> Message:
        return self.fabric.recv(self.src, self.tag, reduce=self.reduce)


class Fabric:
    def __init__(self, ctx: zmq.Context, rank: int, secret: str, clock: Clock, *, bind: str,
                 window: Window | None = None, peer_window_name: Callable[[int], str] | None = None,
                 phantom: bool = False, copy_threshold: int = 64 << 10, recv_timeout: float = 120.0,
                 abort_check: Callable[[], None] | None = None, spin_s: float = SPIN_S, slowdown: float = 0.0,
                 inbox_name: Callable[[int], str] | None = None):
        self.spin_s = spin_s
        self.slowdown = slowdown  # > 0: real-time shaping, wall time = emulated transit x slowdown
        self.ctx, self.rank, self.secret, self.clock = ctx, rank, secret, clock
        self.ports: PortClock | None = None
        self.phantom = phantom
        # phantom collectives exchange entry states and simulate the rest (interconnect.sim); set
        # RSD_PHANTOM_MESSAGES=1 to send every message's header instead, as a check of the simulation
        self.emulate_only = phantom and os.environ.get("RSD_PHANTOM_MESSAGES", "") != "1"
        self.copy_threshold = copy_threshold
        self.recv_timeout = recv_timeout
        self.abort_check = abort_check or (lambda: None)
        self.window = window
        self.peer_windows = PeerWindows(peer_window_name) if window is not None else None
        self._pull = auth.make_server(ctx.socket(zmq.PULL))
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        if bind.startswith("tcp://") and bind.endswith(":*"):
            host = bind.rsplit(":", 1)[0]
            self.endpoint = f"{host}:{self._pull.bind_to_random_port(host)}"
        else:
            self._pull.bind(bind)
            self.endpoint = bind
        self.peers: dict[int, str] = {}
        self._push: dict[int, zmq.Socket] = {}
        self._early: dict[tuple, deque[Message]] = {}
        self._unacked: dict[int, int | None] = {}  # token -> staged window offset (None: registered buffer)
        self._tokens = itertools.count(1)
        self.malformed = 0
        self.stale = 0  # messages of an epoch before the current one, dropped
        self.epoch = 0
        self.bytes_sent = 0
        self.board_calls = 0  # collectives whose data went on the board (interconnect.collectives)
        # cards on one host: every message through shared-memory rings (interconnect.ringpath)
        self.rings = RingPath(self, inbox_name) if inbox_name is not None else None

    def configure(self, peers: dict[int, str], port_clock: PortClock) -> None:
        """Set the peers' endpoints and the link model; a peer whose endpoint changed is reconnected."""
        peers = {int(k): v for k, v in peers.items()}
        for card, sock in list(self._push.items()):
            if peers.get(card) != self.peers.get(card):
                sock.close(linger=0)
                del self._push[card]
        self.peers = peers
        self.ports = port_clock
        if self.rings is not None:
            self.rings.configure(peers)
        if self.peer_windows is not None:
            self.peer_windows.forget()

    def reset(self, epoch: int | None = None) -> None:
        """Drop stray messages of a collective that broke off; with ``epoch``, enter that epoch.

        Every card of a run enters the same new epoch when the host resynchronises them; messages
        tagged with an older epoch, queued or still in flight, are dropped from then on.
        """
        if epoch is not None:
            self.epoch = max(self.epoch, int(epoch))
        if self.rings is not None:
            self.rings.board.reset()  # call numbers restart: old entry states must not match
        for key in list(self._early):
            tag = key[1]
            if epoch is None or not (tag and isinstance(tag[0], int) and tag[0] >= self.epoch):
                for msg in self._early.pop(key):
                    self.done(msg)  # a window region goes back to its sender

    def _sock(self, dst: int) -> zmq.Socket:
        sock = self._push.get(dst)
        if sock is None:
            if dst not in self.peers:
                raise FabricError(f"card {self.rank}: no route to card {dst}")
            sock = auth.make_client(self.ctx.socket(zmq.PUSH), self.secret)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(self.peers[dst])
            self._push[dst] = sock
        return sock

    # -- sending -------------------------------------------------------------------
    def isend(self, dst: int, tag: tuple, payload: np.ndarray | None, nbytes: int | None = None,
              flows: tuple = ()) -> SendHandle:
        """Send ``payload`` (or, phantom, only its nominal ``nbytes``) to card ``dst``."""
        if self.ports is None:
            raise FabricError(f"card {self.rank}: the fabric is not configured yet")
        if payload is not None and nbytes is None:
            nbytes = payload.nbytes
        head = {"op": "p2p", "src": self.rank, "tag": list(tag), "nbytes": int(nbytes),
                **self.ports.depart(self.clock.now, dst, int(nbytes), flows)}
        if self.slowdown:
            head["sent"] = [self.clock.now, time.time()]
        ring = self.rings is not None and self.rings.active
        sock = None if ring else self._sock(dst)
        self.bytes_sent += int(nbytes)
        if payload is None or self.phantom or not payload.nbytes:
            self._emit(dst, head)
            return SendHandle()
        payload = np.ascontiguousarray(payload)
        if payload.nbytes < self.copy_threshold:
            self._emit(dst, head, memoryview(payload).cast("B"))
            return SendHandle()
        if self.window is not None:
            return self._send_window(dst, head, payload)
        sock.send(wire.pack(head), zmq.SNDMORE)
        return SendHandle(tracker=sock.send(memoryview(payload).cast("B"), copy=False, track=True))

    def _send_window(self, dst: int, head: dict, payload: np.ndarray) -> SendHandle:
        offset = self.window.offset_of(payload)
        staged = offset is None
        if staged:
            offset = self._alloc(payload.nbytes)
            self.window.bytes[offset:offset + payload.nbytes] = payload.view(np.uint8).reshape(-1)
        token = next(self._tokens)
        self._unacked[token] = offset if staged else None
        self._emit(dst, {**head, "shm": [offset, token]})
        # a staged payload was copied: the caller's buffer is free at once
        return SendHandle() if staged else SendHandle(self, token=token)

    def _alloc(self, nbytes: int) -> int:
        while True:
            try:
                return self.window.alloc(nbytes)
            except WindowFull:
                if not any(v is not None for v in self._unacked.values()):
                    raise
                self._pump("room in the fabric window")

    def _wait_ack(self, token: int) -> None:
        while token in self._unacked:
            self._pump(f"an acknowledgement of message {token}")

    def post(self, dst: int, tag: tuple, meta: list[int]) -> None:
        """Send a few ints that the emulated hardware would not send (bookkeeping of the emulation
        itself): no stamp, no port time, no emulated cost. ``take`` receives them."""
        self._emit(dst, {"op": "meta", "src": self.rank, "tag": list(tag), "meta": list(meta)})

    def _emit(self, dst: int, head: dict, payload: memoryview | None = None) -> None:
        """Send a header (and a small payload, copied) to ``dst``: through its ring on this host, else ZeroMQ."""
        if self.rings is not None and self.rings.active:
            self.rings.send(dst, wire.pack(head), payload)
        elif payload is None:
            self._sock(dst).send(wire.pack(head))
        else:
            self._sock(dst).send_multipart([wire.pack(head), payload], copy=True)

    def take(self, src: int, tag: tuple) -> list[int]:
        return self._match(src, tuple(tag)).meta

    def send(self, dst: int, tag: tuple, payload, nbytes: int | None = None, flows: tuple = ()) -> None:
        self.isend(dst, tag, payload, nbytes, flows).wait()

    # -- receiving -----------------------------------------------------------------------
    def recv(self, src: int, tag: tuple, *, reduce: bool = False) -> Message:
        """The message from ``src`` with ``tag``; the card's clock moves to its arrival (and, with
        ``reduce``, past reducing it into a local buffer). Call ``done(msg)`` once its data is used."""
        msg = self._match(src, tuple(tag))
        self.clock.now, arrival = self.ports.receive(self.clock.now, msg.stamp, msg.nbytes, reduce)
        if self.slowdown and msg.sent is not None:
            self._shape(msg.sent, arrival)
        return msg

    def irecv(self, src: int, tag: tuple, *, reduce: bool = False) -> "RecvHandle":
        """A receive to complete later with ``.wait()``; receives complete in the order waited on."""
        return RecvHandle(self, src, tuple(tag), reduce)

    def _shape(self, sent: tuple, arrival: int) -> None:
        """Real-time shaping: deliver no earlier, on the wall clock, than the link model says,
        stretched by ``slowdown`` (sender's wall time of sending + emulated transit x slowdown)."""
        emu_sent, wall_sent = sent
        wait = wall_sent + (arrival - emu_sent) * 1e-9 * self.slowdown - time.time()
        if wait > 0:
            time.sleep(wait)

    def done(self, msg: Message) -> None:
        """The receiver no longer needs the payload: a window region goes back to its sender."""
        if msg.shm is not None:
            self._emit(msg.src, {"op": "ack", "src": self.rank, "token": msg.shm[1]})
        msg.data = msg.frame = None

    def _match(self, src: int, tag: tuple) -> Message:
        key = (src, tag)
        while True:
            early = self._early.get(key)
            if early:
                msg = early.popleft()
                if not early:
                    del self._early[key]
                return msg
            self._pump(f"a message from card {src} (tag {list(tag)})", src)

    def _pump(self, waiting_for: str, src: int | None = None) -> None:
        """Wait for one fabric message and file it (data into the table, acks into the ledger)."""
        if self.rings is not None and self.rings.active:
            self.rings.pump(waiting_for, src)
            return
        if not self._spin():
            self._block(waiting_for)
        self._file_checked(self._pull.recv_multipart(copy=False))

    def _file_checked(self, frames) -> None:
        try:
            self._file(frames)
        except Exception as exc:  # no message may break the collective that is waiting
            self.malformed += 1
            log.warning("card %d: rejected a malformed fabric message: %s", self.rank, exc)

    def _spin(self) -> bool:
        """Poll without sleeping for a short while, yielding the core between polls: a peer's
        answer usually comes within microseconds, and a sleeping process wakes up in milliseconds
        when the host has fewer cores than cards."""
        until = time.perf_counter() + self.spin_s
        while True:
            if self._pull.poll(0):
                return True
            if time.perf_counter() > until:
                return False
            os.sched_yield()

    def _block(self, waiting_for: str) -> None:
        deadline = time.monotonic() + self.recv_timeout
        while not self._pull.poll(100):
            self.abort_check()
            if time.monotonic() > deadline:
                raise FabricTimeout(f"card {self.rank}: waited {self.recv_timeout:.0f} s for {waiting_for}")

    def _checked(self, h: dict) -> dict:
        """Refuse a header whose sender, tag or sizes this card cannot act on."""
        src = h.get("src")
        if type(src) is not int or src not in self.peers:
            raise wire.WireError(f"sender {src!r} is no card of this run")
        tag = h.get("tag", [])
        if not isinstance(tag, list) or not all(type(t) is int for t in tag):
            raise wire.WireError(f"tag {tag!r} is not a list of ints")
        if h["op"] == "p2p":
            if type(h.get("nbytes")) is not int or h["nbytes"] < 0:
                raise wire.WireError(f"nbytes {h.get('nbytes')!r} is not a size")
            shm = h.get("shm")
            if shm is not None and not (isinstance(shm, list) and len(shm) == 2
                                        and all(type(v) is int and v >= 0 for v in shm)):
                raise wire.WireError(f"window reference {shm!r} is not [offset, token]")
        return h

    def _file(self, frames) -> None:
        """File one message: ZeroMQ frames, or (header, payload) bytes read from a ring."""
        h = self._checked(wire.unpack(frames[0] if isinstance(frames[0], bytes) else frames[0].buffer))
        if h["op"] == "ack":
            offset = self._unacked.pop(int(h["token"]))
            if offset is not None:
                self.window.free(offset)
            return
        if h["op"] == "meta":
            meta = h["meta"]
            if not isinstance(meta, list) or not all(type(v) is int for v in meta):
                raise wire.WireError("meta must be a list of ints")
            self._early.setdefault((int(h["src"]), tuple(h["tag"])), deque()).append(
                Message(int(h["src"]), tuple(h["tag"]), 0, {}, meta=meta))
            return
        if h["op"] != "p2p" or len(frames) > 2:
            raise wire.WireError(f"unexpected op {h['op']!r} with {len(frames) - 1} payload frames")
        tag = tuple(h["tag"])
        if tag and isinstance(tag[0], int) and tag[0] < self.epoch:
            self.stale += 1
            if "shm" in h:  # the sender's window region is free again
                self.done(Message(int(h["src"]), tag, 0, {}, shm=(0, int(h["shm"][1]))))
            return
        msg = Message(int(h["src"]), tag, int(h["nbytes"]),
                      {"start": int(h["start"]), "occ": int(h["occ"]), "lat": int(h["lat"])})
        if "sent" in h:
            msg.sent = (int(h["sent"][0]), float(h["sent"][1]))
        if len(frames) == 2:
            msg.frame = frames[1]
            msg.data = np.frombuffer(frames[1] if isinstance(frames[1], bytes) else frames[1].buffer, np.uint8)
        elif "shm" in h and not self.phantom:
            offset, token = int(h["shm"][0]), int(h["shm"][1])
            msg.shm = (offset, token)
            msg.data = self.peer_windows.view(msg.src, offset, msg.nbytes)
        if msg.data is not None and msg.data.nbytes != msg.nbytes:
            raise wire.WireError(f"from card {msg.src}: header says {msg.nbytes} bytes, payload has "
                                 f"{msg.data.nbytes}")
        self._early.setdefault((msg.src, msg.tag), deque()).append(msg)

    def close(self) -> None:
        if self.rings is not None:
            self.rings.close()
        for sock in self._push.values():
            sock.close(linger=2000)
        self._pull.close(linger=0)
        if self.window is not None:
            self.window.close()
