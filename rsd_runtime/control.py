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

    def forget(self, card: int) -> None:
        """Before a restart: the card's old hello and death are history."""
        with self._lock:
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

    def _on_card_message(self, msg) -> None:
        ident = bytes(msg[0]).decode(errors="replace")
        sender = self._card_of(ident)
        try:
            header = wire.unpack(msg[1].buffer) if len(msg) > 1 else None
        except wire.WireError as exc:
            raise Malformed("header", f"a malformed message from {ident!r}: {exc}") from None
        if header is None:
            raise Malformed("header", f"an empty message from {ident!r}")
        op = header["op"]
        if op in ("hello", "heartbeat"):
            if not hmac.compare_digest(str(header.get("secret", "")).encode(), self.secret.encode()):
                raise Malformed("secret", f"{op} from {ident!r} with a wrong run secret")
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
            fresh = {c: e for c, e in died.items() if c not in self.dead}
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
