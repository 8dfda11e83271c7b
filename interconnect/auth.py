"""Run-secret authentication for every ZeroMQ connection of a run (ZAP, PLAIN).

Each process of a run (host and cards) answers ZeroMQ's authentication
requests (RFC 27, ZAP) for the sockets it binds: a peer must present the
user name ``rsd`` and the run's secret in the PLAIN handshake, or its
connection is refused before any message is delivered. PLAIN carries the
secret in clear; that is acceptable because ipc sockets live in a directory
only the run's owner can enter and tcp binds to loopback unless told otherwise.
"""
from __future__ import annotations

import hmac
import logging
import threading

import zmq

log = logging.getLogger("rsd.auth")
USER = b"rsd"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class RunAuthenticator:
    """A ZAP handler thread on one context; counts refused connections."""

    def __init__(self, ctx: zmq.Context, secret: str):
        self.secret = secret.encode()
        self.refused = 0
        self.accepted = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rsd-zap", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._sock.recv_multipart()
            version, request_id, _domain, address, _identity, mechanism = frames[:6]
            creds = frames[6:]
            ok = (mechanism == b"PLAIN" and len(creds) == 2 and creds[0] == USER
                  and hmac.compare_digest(creds[1], self.secret))
            if ok:
                self.accepted += 1
                self._sock.send_multipart([version, request_id, b"200", b"OK", USER, b""])
            else:
                self.refused += 1
                log.warning("refused a %s connection from %r: it does not carry the run's secret",
                            mechanism.decode(errors="replace"), address.decode(errors="replace") or "local")
                self._sock.send_multipart([version, request_id, b"400", b"wrong run secret", b"", b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


def make_server(sock: zmq.Socket) -> zmq.Socket:
    """Require run-secret authentication from every peer of a socket (set before bind)."""
    sock.setsockopt(zmq.PLAIN_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"rsd")
    return sock


def make_client(sock: zmq.Socket, secret: str) -> zmq.Socket:
    """Present the run's secret on connect (set before connect)."""
    sock.setsockopt(zmq.PLAIN_USERNAME, USER)
    sock.setsockopt(zmq.PLAIN_PASSWORD, secret.encode())
    return sock
