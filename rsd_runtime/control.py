"""The host's control plane: one ROUTER socket to every card, one I/O thread.

Callers on any thread submit requests through a thread-local PUSH socket; the
I/O thread owns the ROUTER (ZeroMQ sockets are not thread-safe), forwards
requests, matches replies to futures by request id, records heartbeats, and
watches the card processes so that a dead card fails its pending calls at once
instead of leaving them to hang.

Only peers that opened with the run's secret are heard; anything else, and any
malformed message, is counted (``malformed``), logged and dropped. Each message
is handled in its own try: no message stops the I/O thread.
"""
from __future__ import annotations

import hmac
import itertools
import logging
import threading
import re
import time
from collections import Counter
from concurrent.futures import Future
from typing import Callable

import zmq

from interconnect import auth, wire
from rsd_runtime.errors import CardDied, CardError

log = logging.getLogger("rsd.host")
_IDENTITY = re.compile(r"^card(\d{1,4})(\.hb)?$")  # a card's command socket, or its heartbeat socket


class Malformed(ValueError):
    """A message the control plane drops; its first argument is the counter it goes under."""


class ControlPlane:
    def __init__(self, ctx: zmq.Context, address: str, secret: str, *, num_cards: int,
                 check_cards: Callable[[], dict[int, CardDied]], heartbeat_timeout: float):
        self.ctx = ctx
        self.num_cards = num_cards
        self.malformed: Counter[str] = Counter()  # reason -> messages dropped
        self.secret = secret
        self.check_cards = check_cards
        self.heartbeat_timeout = heartbeat_timeout
        self.router = auth.make_server(ctx.socket(zmq.ROUTER))
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        self._inproc = f"inproc://rsd-control-{id(self)}"
        self._pull = ctx.socket(zmq.PULL)
        self._pull.bind(self._inproc)
        self._local = threading.local()
        self._senders: list[zmq.Socket] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, str, Future, tuple]] = {}
        self.hello: dict[int, dict] = {}  # card -> its hello header (latest)
        self.hello_event = threading.Condition(self._lock)
        self.last_seen: dict[int, float] = {}
        self.dead: dict[int, CardDied] = {}
        self._buried: set[int] = set()  # pids of restarted cards' old processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rsd-control", daemon=True)
        self._thread.start()

    # -- caller side ----------------------------------------------------------
    def submit(self, card: int, op: str, fields: dict | None = None, frames=()) -> Future:
        fut: Future = Future()
        with self._lock:
            if card in self.dead:
                fut.set_exception(self.dead[card])
                return fut
            req_id = next(self._ids)
            # frames stay referenced until the reply: ZeroMQ may still read them
            self._pending[req_id] = (card, op, fut, tuple(frames))
        header = wire.pack({"op": op, "id": req_id, **(fields or {})})
        self._sender().send_multipart([f"card{card}".encode(), header, *frames], copy=False)
        return fut

    def notify(self, card: int, op: str, fields: dict | None = None) -> None:
        """Send a message that gets no reply (an abort, say); safe from any thread."""
        self._sender().send_multipart([f"card{card}".encode(), wire.pack({"op": op, **(fields or {})})])

    def call(self, card: int, op: str, fields: dict | None = None, frames=(), timeout: float | None = None):
        return self.submit(card, op, fields, frames).result(timeout)

    def _sender(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._inproc)
            self._local.sock = sock
            with self._lock:
                self._senders.append(sock)
        return sock

    def wait_hello(self, cards, deadline: float) -> set[int]:
        """Block until every card in ``cards`` said hello, one died, or the deadline; returns the missing."""
        with self.hello_event:
            while True:
                missing = {c for c in cards if c not in self.hello}
                if not missing or any(c in self.dead for c in cards) or time.monotonic() >= deadline:
                    return missing
                self.hello_event.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    @property
    def num_malformed(self) -> int:
        """Messages dropped as malformed, every reason together (a server exports it)."""
        return sum(self.malformed.values())

    def forget(self, card: int, pid: int | None = None) -> None:
        """Before a restart: the card's old hello and death are history. A health check that looked at
        the old process ``pid`` before this call cannot declare the card dead again afterwards."""
        with self._lock:
            if pid is not None:
                self._buried.add(pid)
            self.hello.pop(card, None)
            self.dead.pop(card, None)
            self.last_seen.pop(card, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self._senders:
            s.close(linger=0)
        self._pull.close(linger=0)
        self.router.close(linger=0)

    # -- I/O thread -------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        next_check = 0.0
        while not self._stop.is_set():
            events = dict(poller.poll(20))
            if self.router in events:
                for _ in range(256):  # drain what is there, then look at the rest
                    try:
                        msg = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(self._on_card_message, msg)
            if self._pull in events:
                for _ in range(256):
                    try:
                        msg = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(self._forward, msg)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.05
                self._handle(self._check_health, now)

    def _handle(self, fn, arg) -> None:
        """One message (or health check) in its own try: a bad one is counted and dropped."""
        try:
            fn(arg)
        except Malformed as exc:
            self.malformed[exc.args[0]] += 1
            log.warning("control: dropped a message: %s", exc.args[1])
        except Exception as exc:  # a bug must not stop the thread every caller depends on
            self.malformed["error"] += 1
            log.exception("control: %s failed on a message: %s", fn.__name__, exc)

    def _forward(self, msg) -> None:
        try:
            self.router.send_multipart(msg, copy=False)
        except zmq.ZMQError as exc:
            card = int(bytes(msg[0])[4:])
            req_id = wire.unpack(msg[1].buffer).get("id")
            if req_id is not None:
                self._fail_request(req_id, CardDied(card, None, f"cannot be reached ({exc.strerror})"))

    def _card_of(self, ident: str) -> int:
        """The card behind a socket identity; only cards of this cluster."""
        m = _IDENTITY.match(ident)
        if m is None or int(m[1]) >= self.num_cards:
            raise Malformed("identity", f"a message from {ident!r}, which is no card of this cluster")
        return int(m[1])

    def _header(self, msg) -> tuple[str, int, dict]:
        """(sender identity, its card, the message's header); Malformed if any is not what a card sends."""
        ident = bytes(msg[0]).decode(errors="replace")
        card = self._card_of(ident)
        try:
            header = wire.unpack(msg[1].buffer) if len(msg) > 1 else None
        except wire.WireError as exc:
            raise Malformed("header", f"a malformed message from {ident!r}: {exc}") from None
        if header is None:
            raise Malformed("header", f"an empty message from {ident!r}")
        return ident, card, header

    def _check_secret(self, header: dict, ident: str) -> None:
        if not hmac.compare_digest(str(header.get("secret", "")).encode(), self.secret.encode()):
            raise Malformed("secret", f"{header['op']} from {ident!r} with a wrong run secret")

    def _on_card_message(self, msg) -> None:
        ident, sender, header = self._header(msg)
        op = header["op"]
        if op in ("hello", "heartbeat"):
            self._check_secret(header, ident)
            card = header.get("card")
            if type(card) is not int or card != sender:
                raise Malformed("field", f"{op} from {ident!r} names card {card!r}")
            if op == "hello" and (not isinstance(header.get("fabric"), str) or type(header.get("pid")) is not int):
                raise Malformed("field", f"hello from {ident!r} without a fabric endpoint and pid")
            with self._lock:
                self.last_seen[card] = time.monotonic()
                if op == "hello":
                    self.hello[card] = header
                    self.hello_event.notify_all()
            return
        if op != "reply":
            raise Malformed("op", f"unexpected op {op!r} from {ident!r}")
        req_id = header.get("id")
        if type(req_id) is not int:
            raise Malformed("field", f"a reply from {ident!r} with id {req_id!r}")
        with self._lock:
            entry = self._pending.get(req_id)
            if entry is None or sender != entry[0] or ident != f"card{sender}" or sender not in self.hello:
                raise Malformed("unmatched", f"a reply from {ident!r} that matches no request")
            del self._pending[req_id]
        card, req_op, fut, _ = entry
        if header.get("ok") is True:
            fut.set_result((header, msg[2:]))
        else:
            fut.set_exception(CardError(card, req_op, str(header.get("error", "?")), str(header.get("kind", ""))))

    def _send_abort(self, card: int, reason: str) -> None:
        try:
            self.router.send_multipart([f"card{card}".encode(), wire.pack({"op": "abort", "reason": reason})])
        except zmq.ZMQError:
            pass

    def _fail_request(self, req_id: int, exc: Exception) -> None:
        with self._lock:
            entry = self._pending.pop(req_id, None)
        if entry is not None and not entry[2].done():
            entry[2].set_exception(exc)

    def _check_health(self, now: float) -> None:
        died = self.check_cards()
        with self._lock:
            for card, seen in self.last_seen.items():
                if card not in self.dead and card not in died and now - seen > self.heartbeat_timeout:
                    died[card] = CardDied(card, self.hello.get(card, {}).get("pid"),
                                          f"sent no heartbeat for {now - seen:.1f} s (hung or stopped)")
            fresh = {c: e for c, e in died.items() if c not in self.dead and e.pid not in self._buried}
            self.dead.update(fresh)
            victims = [(rid, self._pending.pop(rid)) for rid in
                       [rid for rid, entry in self._pending.items() if entry[0] in fresh]]
            if fresh:
                self.hello_event.notify_all()
        for exc in fresh.values():
            log.error("%s", exc)
        if fresh:  # cards waiting on a dead peer inside a collective stop waiting
            with self._lock:
                busy = {entry[0] for entry in self._pending.values()} - set(self.dead)
            for card in busy:
                self._send_abort(card, "; ".join(str(e).splitlines()[0] for e in fresh.values()))
        for _, (card, _op, fut, _frames) in victims:
            if not fut.done():
                fut.set_exception(fresh[card])


class StepChannel:
    """Step plans to the cards and their replies, straight from the thread that runs the steps.

    Every other command goes through the control plane's I/O thread. A step is on the path of
    every token, so it skips that hop and its two thread hand-offs: the stepping thread owns
    this ROUTER (one thread at a time; ``lock`` serialises callers), sends the plan to each card
    and polls for the replies itself. Between polls it looks at the cards the control plane has
    seen die, so a dead card still fails the step within the control plane's health period.

    A card opens its step socket with a hello carrying the run secret and its pid; a plan goes
    to a card only once the hello of its current process (the pid of its control hello) is in.
    Replies of several steps in flight (instances stepped together) are kept by request id
    until their ``gather``; stale replies of an abandoned step are dropped.
    """

    POLL_MS = 20  # poll slice between checks for dead cards
    CONNECT_TIMEOUT_S = 30.0  # how long a card's step socket may take to say hello after its control hello

    def __init__(self, ctx: zmq.Context, address: str, control: ControlPlane):
        self.control = control
        self.address = address
        self.sock = auth.make_server(ctx.socket(zmq.ROUTER))
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted card takes its identity over
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pids: dict[int, int] = {}  # card -> pid of its latest step hello
        self._open: dict[int, set[int]] = {}  # request id -> cards whose reply is still due
        self._replies: dict[int, dict[int, tuple[dict, list]]] = {}  # request id -> card -> (header, frames)

    def send(self, cards, blob) -> int:
        """Send one plan to ``cards``; its request id. Raises ``CardDied`` for a card that cannot get it."""
        with self.lock:
            req_id = next(self._ids)
            header = wire.pack({"op": "step", "id": req_id})
            self._open[req_id], self._replies[req_id] = set(), {}
            for card in cards:
                self._await_connected(card)
                try:
                    self.sock.send_multipart([f"card{card}".encode(), header, blob], copy=False)
                except zmq.ZMQError as exc:
                    self.discard(req_id)
                    raise CardDied(card, None, f"cannot be reached ({exc.strerror})") from None
                self._open[req_id].add(card)
            return req_id

    def gather(self, req_id: int, cards, timeout: float | None = None,
               stop_on_error: bool = True) -> tuple[dict[int, tuple[dict, list]], Exception | None]:
        """The replies of ``cards`` to step ``req_id``, and the first failure (a card error, or a
        card the control plane saw die), if any; with ``stop_on_error`` it returns at that failure.
        ``timeout``: give up after that many seconds (the missing cards are simply absent)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        want = set(cards)
        failure = None
        with self.lock:
            got = self._replies.setdefault(req_id, {})
            while True:
                for card in want & got.keys():
                    header, _ = got[card]
                    if header.get("ok") is not True and failure is None:
                        failure = CardError(card, "step", str(header.get("error", "?")), str(header.get("kind", "")))
                missing = want - got.keys()
                dead = [c for c in missing if c in self.control.dead]
                if dead and failure is None:
                    failure = self.control.dead[dead[0]]
                if not missing or (failure is not None and (stop_on_error or missing <= set(dead))):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._receive(self.POLL_MS)
            return {c: got[c] for c in want & got.keys()}, failure

    def discard(self, req_id: int) -> None:
        """Forget step ``req_id``: its replies so far, and any that come later."""
        with self.lock:
            self._open.pop(req_id, None)
            self._replies.pop(req_id, None)

    def forget(self, card: int) -> None:
        """Before a restart: the card's old step socket is history."""
        with self.lock:
            self._pids.pop(card, None)

    def close(self) -> None:
        self.sock.close(linger=0)

    # -- receiving (the caller holds the lock) -------------------------------------------
    def _await_connected(self, card: int) -> None:
        deadline = time.monotonic() + self.CONNECT_TIMEOUT_S
        while True:
            pid = self.control.hello.get(card, {}).get("pid")
            if pid is not None and self._pids.get(card) == pid:
                return
            if card in self.control.dead:
                raise self.control.dead[card]
            if time.monotonic() >= deadline:
                raise CardDied(card, pid, f"its step socket did not connect within {self.CONNECT_TIMEOUT_S:.0f} s")
            self._receive(self.POLL_MS)

    def _receive(self, timeout_ms: int) -> None:
        """Take every message that arrives within ``timeout_ms`` (at least one wait), then what is queued."""
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                msg = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.control._handle(self._on_message, msg)  # a bad message is counted and dropped, as there

    def _on_message(self, msg) -> None:
        ident, card, header = self.control._header(msg)
        op = header["op"]
        if op == "hello":
            self.control._check_secret(header, ident)
            if header.get("card") != card or type(header.get("pid")) is not int:
                raise Malformed("field", f"a step hello from {ident!r} names card {header.get('card')!r}")
            self._pids[card] = header["pid"]
            return
        if op != "reply" or type(header.get("id")) is not int:
            raise Malformed("op", f"unexpected step message {op!r} from {ident!r}")
        req_id = header["id"]
        if card not in self._open.get(req_id, ()):
            return  # a step given up (aborted after a failure): its late replies go
        self._open[req_id].discard(card)
        self._replies[req_id][card] = (header, msg[2:])
