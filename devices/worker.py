"""The card process: its stores, its control channel to the host, its loop.

Started by the host as ``python -m devices --run RUN --card I --control ADDR``
(a fresh interpreter: spawned, never forked). The run's secret arrives in the
environment, not on the command line where ``ps`` would show it.

Two threads, each with its own socket (ZeroMQ sockets are not thread-safe):
the main thread serves commands; a heartbeat thread tells the host the card
is alive, even during a long command. A lifeline thread (``devices.lifeline``)
ends the card, cleaning up the run, if the host process is gone.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque

import psutil
import zmq

from devices import fields
from devices.arena import WeightArena
from devices.collective_ops import CollectiveOps
from devices.expert_ops import ExpertOps
from devices.inference_ops import InferenceOps
from devices.faults import CardFault, CardFaults
from devices.kv_cache import KVCacheStore, KVLayout
from devices.lifeline import watch_host
from devices.memory import DeviceMemory
from devices.shm import SHM_DIR, segment_name
from devices.spec import DeviceSpec, get_spec
from interconnect import auth, shmring, wire
from interconnect.fabric import Clock, Fabric, FabricError
from interconnect.links import LinkDegradation
from interconnect.window import Window

log = logging.getLogger("rsd.card")
SECRET_ENV = "RSD_RUN_SECRET"
HOST_PID_ENV = "RSD_HOST_PID"
FABRIC_WINDOW_BYTES = 1 << 30  # sparse: only the regions in use cost host memory


class Card:
    def __init__(self, args, spec: DeviceSpec):
        self.card = args.card
        self.run_name = args.run
        self.spec = spec
        self.phantom = args.phantom
        self.slowdown = args.slowdown
        self.state = "starting"
        self.clock = Clock()  # emulated clock, integer nanoseconds
        self.fabric: Fabric | None = None
        self.ctrl = None
        self.backlog: deque = deque()
        self.memory = DeviceMemory(self.card, spec.memory_bytes)
        self.arena = WeightArena(self.run_name, self.card, self.memory, attach=args.attach, backed=not self.phantom)
        self.kv: KVCacheStore | None = None
        if args.attach and self.arena.meta.get("kv"):
            self.kv = KVCacheStore(self.run_name, self.card, self.memory, KVLayout(**self.arena.meta["kv"]),
                                   attach=True, backed=not self.phantom)
        self.stopping = threading.Event()
        self.faults = CardFaults()
        self.link_faults: dict[int, LinkDegradation] = {}  # destination card -> fault; read by the port clock
        self.handlers = {
            "status": self.op_status,
            "put": self.op_put,
            "get": self.op_get,
            "free": self.op_free,
            "list": self.op_list,
            "kv_init": self.op_kv_init,
            "ping": self.op_ping,
            "shutdown": self.op_shutdown,
            "debug_exit": self.op_debug_exit,
            "debug_sleep": self.op_debug_sleep,
            "inject": self.op_inject,
            "link_fault": self.op_link_fault,
            "abort": lambda h, frames: ({}, []),  # nothing runs: nothing to abort
        }
        self.collectives = CollectiveOps(self)
        self.handlers.update(self.collectives.handlers())
        self.inference = InferenceOps(self)
        self.handlers.update(self.inference.handlers())
        self.experts = ExpertOps(self)
        self.handlers.update(self.experts.handlers())

    # -- ops: each takes (header, frames) and returns (reply fields, frames) --
    def op_status(self, h, frames):
        return {
            "card": self.card,
            "pid": os.getpid(),
            "state": self.state,
            "memory_used": self.memory.used,
            "memory_capacity": self.memory.capacity,
            "host_rss": psutil.Process().memory_info().rss,
            "clock_ns": self.clock.now,
            "num_tensors": len(self.arena.entries),
            "kv_blocks": self.kv.layout.num_blocks if self.kv else 0,
            "fabric_bytes_sent": self.fabric.bytes_sent if self.fabric else 0,
            "fabric_board_calls": self.fabric.board_calls if self.fabric else 0,
            "fabric_malformed": self.fabric.malformed if self.fabric else 0,
            "fabric_refused": self.authenticator.refused if self.fabric else 0,
            "device": self.spec.name,
            "phantom": self.phantom,
        }, []

    def op_put(self, h, frames):
        """Place a tensor in device memory, or with ``tier`` in a staging tier (``devices.expert_ops``)."""
        name, dtype, shape = fields.text(h, "name"), wire.check_dtype(h.get("dtype")), fields.shape(h)
        store = self.arena if h.get("tier") is None else self.experts.store(fields.text(h, "tier"))
        if self.phantom and not frames:  # a phantom card only accounts for the tensor
            store.allocate(name, dtype, shape)
            return store.describe(name), []
        if len(frames) != 1:
            raise wire.WireError(f"put of {name!r} needs exactly one payload frame, got {len(frames)}")
        store.allocate(name, dtype, shape)
        if not self.phantom:
            try:
                store.write(name, frames[0].buffer)
            except Exception:
                store.free(name)
                raise
        return store.describe(name), []

    def op_get(self, h, frames):
        name = fields.text(h, "name")
        return self.arena.describe(name), ([] if self.phantom else [self.arena.view(name)])

    def op_free(self, h, frames):
        self.arena.free(fields.text(h, "name"))
        return {}, []

    def op_list(self, h, frames):
        return {"tensors": [self.arena.describe(n) for n in self.arena.entries]}, []

    def op_kv_init(self, h, frames):
        return self.install_kv(KVLayout(**h["layout"])), []

    def install_kv(self, layout: KVLayout) -> dict:
        """(Re)create the KV cache store with this layout; its old segment goes."""
        if self.kv is not None:
            self.kv.release(unlink=True)
            self.kv = None
        self.kv = KVCacheStore(self.run_name, self.card, self.memory, layout, backed=not self.phantom)
        self.arena.set_meta("kv", layout.to_dict())
        return {"nbytes": layout.nbytes, "segment": self.kv.segment.name if self.kv.segment else None}

    def op_ping(self, h, frames):
        return {"t": h.get("t")}, list(frames)

    def op_shutdown(self, h, frames):
        self.stopping.set()
        return {}, []

    def op_debug_exit(self, h, frames):
        os._exit(int(h.get("code", 1)))

    def op_inject(self, h, frames):
        """Arm a kill or pause before a later step (``devices.faults``)."""
        fault = CardFault(fields.text(h, "kind"), self.card, fields.integer(h, "at_step", 1, default=1),
                          h.get("seconds", 0.0))
        self.faults.arm(fault)
        return {"fires_at_step": self.faults.steps + fault.at_step}, []

    def op_link_fault(self, h, frames):
        """Degrade this card's path to ``dst`` from an emulated time on (``LinkDegradation``)."""
        dst = fields.integer(h, "dst", 0, max(len(self.fabric.peers), 1))
        if dst == self.card:
            raise fields.FieldError(f"dst is {dst}: a card has no link to itself")
        self.link_faults[dst] = LinkDegradation(h.get("bw_factor", 1.0), h.get("added_latency_ns", 0),
                                                h.get("from_ns", 0))
        return {}, []

    def op_debug_sleep(self, h, frames):
        time.sleep(float(h.get("seconds", 1.0)))
        return {}, []

    # -- loop -------------------------------------------------------------------
    def serve(self, ctx: zmq.Context, control: str, secret: str, heartbeat_s: float, fabric_bind: str,
              steps: str | None = None) -> None:
        authenticator = auth.RunAuthenticator(ctx, secret)
        window = inbox_name = None
        if fabric_bind.startswith("ipc://"):  # cards on one host: large payloads through shared memory
            name = segment_name(self.run_name, self.card, "fabric")
            (SHM_DIR / name).unlink(missing_ok=True)  # a window is transient: a restarted card makes a new one
            window = Window(name, FABRIC_WINDOW_BYTES)
            if shmring.SUPPORTED:  # small messages through shared-memory rings
                inbox_name = lambda c: segment_name(self.run_name, c, "inbox")  # noqa: E731
        self.fabric = Fabric(ctx, self.card, secret, self.clock, bind=fabric_bind, window=window,
                             peer_window_name=lambda c: segment_name(self.run_name, c, "fabric"),
                             phantom=self.phantom, abort_check=self._abort_check, slowdown=self.slowdown,
                             inbox_name=inbox_name)
        self.authenticator = authenticator
        sock = self.ctrl = _dealer(ctx, secret, f"card{self.card}", control, linger_ms=1000)
        step_sock = None
        if steps:  # step plans come straight from the host's stepping thread (rsd_runtime.control.StepChannel)
            step_sock = _dealer(ctx, secret, f"card{self.card}", steps, linger_ms=1000)
            step_sock.send(wire.pack({"op": "hello", "card": self.card, "pid": os.getpid(), "secret": secret}))
        hb = threading.Thread(target=self._heartbeat, args=(ctx, control, secret, heartbeat_s), daemon=True)
        hb.start()
        sock.send(wire.pack({"op": "hello", "card": self.card, "pid": os.getpid(), "secret": secret,
                             "attached": bool(self.arena.entries), "num_tensors": len(self.arena.entries),
                             "fabric": self.fabric.endpoint}))
        self.state = "idle"
        # the start-up heap (torch, the handlers, the arena) lives as long as the card: out of the
        # collector's sight, an old-generation collection no longer stalls a step for milliseconds
        gc.collect()
        gc.freeze()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if step_sock is not None:
            poller.register(step_sock, zmq.POLLIN)
        while not self.stopping.is_set():
            if self.backlog:
                self._dispatch(sock, self.backlog.popleft())
                continue
            for ready, _ in poller.poll(100):
                if self.stopping.is_set():
                    break
                try:
                    frames = ready.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                self._dispatch(ready, frames)
        self.fabric.close()
        if step_sock is not None:
            step_sock.close()
        sock.close()
        authenticator.close()

    def _abort_check(self) -> None:
        """Called while the fabric waits: an 'abort' from the host ends the wait; other commands queue."""
        while self.ctrl.poll(0):
            frames = self.ctrl.recv_multipart(copy=False)
            try:
                header = wire.unpack(frames[0].buffer)
            except wire.WireError:
                continue
            if header["op"] == "abort":
                raise FabricError(f"card {self.card}: aborted by the host: {header.get('reason', '')}")
            self.backlog.append(frames)

    def _dispatch(self, sock, frames) -> None:
        try:
            header = wire.unpack(frames[0].buffer)
        except wire.WireError as exc:
            log.warning("card %d: dropped a malformed message: %s", self.card, exc)
            return
        req_id = header.get("id")
        handler = self.handlers.get(header["op"])
        busy = header["op"] not in ("status", "ping")
        if busy:
            self.state = "busy"
        try:
            if handler is None:
                raise wire.WireError(f"unknown op {header['op']!r}")
            result, out = handler(header, frames[1:])
            reply = {"op": "reply", "id": req_id, "ok": True, **result}
        except FabricError as exc:  # a collective broke off: its groups' sequence numbers are void
            self.collectives.reset()
            reply, out = {"op": "reply", "id": req_id, "ok": False, "error": str(exc),
                          "kind": type(exc).__name__}, []
        except Exception as exc:  # any failure of one command is reported, never fatal
            log.info("card %d: %s failed: %s", self.card, header["op"], exc)
            reply, out = {"op": "reply", "id": req_id, "ok": False, "error": str(exc),
                          "kind": type(exc).__name__}, []
        if busy:
            self.state = "idle"
        if header["op"] != "abort":
            sock.send_multipart([wire.pack(reply), *out], copy=False)

    def _heartbeat(self, ctx, control, secret, interval) -> None:
        sock = _dealer(ctx, secret, f"card{self.card}.hb", control, linger_ms=0)
        while not self.stopping.wait(interval):
            if self.faults.paused.is_set():  # an injected pause: silent, as a hung card is
                continue
            try:  # never block: with the host gone a DEALER send would wait forever
                sock.send(wire.pack({"op": "heartbeat", "card": self.card, "secret": secret,
                                     "state": self.state, "clock_ns": self.clock.now}), zmq.NOBLOCK)
            except zmq.Again:
                pass
        sock.close()


def _dealer(ctx: zmq.Context, secret: str, identity: str, address: str, *, linger_ms: int) -> zmq.Socket:
    """A DEALER to the host under ``identity``, presenting the run's secret."""
    sock = auth.make_client(ctx.socket(zmq.DEALER), secret)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.connect(address)
    return sock


def host_pid() -> int:
    return int(os.environ.get(HOST_PID_ENV, os.getppid()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m devices", description="One emulated card (started by the host).")
    p.add_argument("--run", required=True)
    p.add_argument("--card", type=int, required=True)
    p.add_argument("--control", required=True, help="ZeroMQ address of the host's control socket")
    p.add_argument("--steps", help="ZeroMQ address of the host's step channel (none: steps come on --control)")
    p.add_argument("--spec", default="atom-plus", help="preset name or a JSON DeviceSpec")
    p.add_argument("--run-dir", help="the run's directory (sockets, logs): removed if the host dies")
    p.add_argument("--attach", action="store_true", help="re-attach to the card's existing segments")
    p.add_argument("--phantom", action="store_true", help="keep no real bytes, only account for them")
    p.add_argument("--heartbeat", type=float, default=0.25, help="seconds between heartbeats")
    p.add_argument("--fabric-bind", required=True, help="ZeroMQ address the card's fabric socket binds")
    p.add_argument("--slowdown", type=float, default=0.0,
                   help="real-time shaping: deliveries wait for the link model's time x this factor (0: off)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    lifeline = watch_host(host_pid(), args.run, args.run_dir, args.card)
    logging.basicConfig(level=os.environ.get("RSD_CARD_LOG", "WARNING"), stream=sys.stderr,
                        format=f"%(asctime)s card{args.card} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the host, which shuts the cards down
    spec = get_spec(args.spec) if not args.spec.startswith("{") else DeviceSpec(**json.loads(args.spec))
    secret = os.environ.pop(SECRET_ENV, "")
    card = Card(args, spec)
    signal.signal(signal.SIGTERM, lambda *_: card.stopping.set())
    ctx = zmq.Context()
    try:
        card.serve(ctx, args.control, secret, args.heartbeat, args.fabric_bind, args.steps)
    finally:
        lifeline.set()
        card.arena.close()
        card.experts.close()
        ctx.destroy(linger=0)
    return 0
