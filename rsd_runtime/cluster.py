"""Cluster: N emulated cards as processes, their lifecycle, and a small API.

    with Cluster(num_devices=4, device="atom-plus") as cluster:
        cluster.put(0, "w", torch.ones(4, 4))
        cluster.get(0, "w")            # read back through card 0
        cluster.status()               # one dict per card

Every segment of a run carries the run's name; the run's end removes them all,
also after a card was killed, and a new launch sweeps runs whose host is gone.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zmq

from devices import shm
from devices.faults import CardFault, FaultPlan
from devices.kv_cache import KVLayout
from devices.memory import fmt_bytes
from devices.spec import DeviceSpec, get_spec
from interconnect import wire
from interconnect.auth import RunAuthenticator
from interconnect.links import LinkDegradation
from interconnect.topology import topology_for
from rsd_runtime.control import ControlPlane, StepChannel
from rsd_runtime.errors import CardDied, ClusterError
from rsd_runtime.supervisor import CardProcess, describe_exit, spawn_card

log = logging.getLogger("rsd.host")

# Host memory an idle card costs (interpreter, numpy, pyzmq, its mappings):
# measured with bench/launch.py on this project's reference machine (~40 MB),
# with margin. A card that computes with torch costs more; see bench/launch.py.
CARD_HOST_BYTES = 64 << 20
MAX_DEVICES = 1024


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive inside the block are recorded and handed to their handlers
    when it ends (a KeyboardInterrupt or SystemExit then), so that they cannot cut a clean-up short.
    Only the main thread can set handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def record(signum, frame):
        got.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        handlers = {}
        for signum, before in previous.items():
            if signal.getsignal(signum) is record:
                signal.signal(signum, before)
                handlers[signum] = before
            else:  # the block set a handler of its own (a cluster restores its SIGTERM handler): keep it
                handlers[signum] = signal.getsignal(signum)
        for signum in dict.fromkeys(got):
            handler = handlers[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


class Cluster:
    def __init__(self, num_devices: int = 1, device: str | DeviceSpec = "atom-plus", *, phantom: bool = False,
                 shm_prefix: str = shm.DEFAULT_PREFIX, start_timeout: float = 60.0,
                 heartbeat_timeout: float = 10.0, card_log_level: str | None = None,
                 topology: str = "switch", link: str | None = None, topology_options: dict | None = None,
                 tenants: list[list[int]] | None = None, transport: str = "ipc", tcp_host: str = "127.0.0.1", slowdown: float = 0.0):
        if not isinstance(num_devices, int) or num_devices < 1:
            raise ClusterError(f"num_devices must be a whole number >= 1, got {num_devices!r}")
        if num_devices > MAX_DEVICES:
            raise ClusterError(f"num_devices={num_devices} exceeds the limit of {MAX_DEVICES} cards per host")
        self.spec = device if isinstance(device, DeviceSpec) else _spec_or_error(device)
        need = num_devices * CARD_HOST_BYTES
        avail = psutil.virtual_memory().available
        if need > avail:
            raise ClusterError(
                f"{num_devices} cards need about {fmt_bytes(need)} of host memory "
                f"({fmt_bytes(CARD_HOST_BYTES)} each); this machine has {fmt_bytes(avail)} available "
                f"(at most {avail // CARD_HOST_BYTES} cards)")
        self.num_devices = num_devices
        # tenants: the cards of instances stepped together, which share the fabric (interconnect.topo_tenants);
        # a fixed-size topology with more cards than num_devices runs on its first cards
        self.topology_config = {"topology": topology, "link": link, "options": dict(topology_options or {}),
                                "tenants": [list(t) for t in tenants or ()]}
        try:
            self.topology = topology_for(topology, num_devices, link, tenants=self.topology_config["tenants"],
                                         **self.topology_config["options"])
        except (ValueError, TypeError) as exc:
            raise ClusterError(str(exc)) from None
        if transport not in ("ipc", "tcp"):
            raise ClusterError(f"unknown transport {transport!r}; known: ipc, tcp")
        self.transport = transport
        self.tcp_host = tcp_host
        if slowdown < 0:
            raise ClusterError(f"slowdown must be >= 0 (0: no real-time shaping), got {slowdown}")
        self.slowdown = slowdown
        self.phantom = phantom
        self.shm_prefix = shm.check_prefix(shm_prefix)
        self.start_timeout = start_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.card_log_level = card_log_level
        self.run_name = ""
        self.run_dir: Path | None = None
        self.procs: dict[int, CardProcess] = {}
        self._expected_exit: set[int] = set()
        self._ctx: zmq.Context | None = None
        self.control: ControlPlane | None = None
        self.steps: StepChannel | None = None
        self._secret = secrets.token_hex(16)
        self._prev_sigterm = None
        self._closed = True
        self.sweep_report: shm.SweepReport | None = None

    # -- lifecycle --------------------------------------------------------------
    def start(self, progress=None) -> "Cluster":
        self.sweep_report = shm.sweep(self.shm_prefix)
        for run, names in self.sweep_report.removed.items():
            log.warning("swept %d stale segments of run %s (its host is gone)", len(names), run)
        for path in self.sweep_report.dirs:
            log.warning("swept the run directory %s (its host is gone)", path)
        if self.sweep_report.foreign:
            names = ", ".join(str(shm.SHM_DIR / n) for n in self.sweep_report.foreign[:5])
            raise ClusterError(
                f"{len(self.sweep_report.foreign)} segments carry the prefix {self.shm_prefix!r} but are not "
                f"this user's rsd-runtime segments ({names}); remove them or choose another --shm-prefix")
        self.run_name = shm.new_run_name(self.shm_prefix)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{self.run_name}-", dir=shm.run_dir_root()))  # mode 0700: only we enter
        self._closed = False
        atexit.register(self.shutdown)
        self._install_sigterm()
        try:
            self._ctx = zmq.Context()
            self._auth = RunAuthenticator(self._ctx, self._secret)
            self.control = ControlPlane(self._ctx, f"ipc://{self.run_dir}/control", self._secret,
                                        num_cards=self.num_devices, check_cards=self._check_cards, heartbeat_timeout=self.heartbeat_timeout)
            self.steps = StepChannel(self._ctx, f"ipc://{self.run_dir}/steps", self.control)
            for card in range(self.num_devices):
                with signals_deferred():  # a SIGTERM lands between spawns: no card is started but not known
                    self.procs[card] = self._spawn(card, attach=False)
            self._await_hello(range(self.num_devices), progress)
            self._fabric_init(range(self.num_devices))
        except BaseException:
            self.shutdown()
            raise
        return self

    def _spawn(self, card: int, *, attach: bool) -> CardProcess:
        spec = self.spec.name if _is_preset(self.spec) else json.dumps(self.spec.to_dict())
        bind = f"ipc://{self.run_dir}/fabric{card}" if self.transport == "ipc" else f"tcp://{self.tcp_host}:*"
        return spawn_card(card, run=self.run_name, control=f"ipc://{self.run_dir}/control",
                          steps=f"ipc://{self.run_dir}/steps", secret=self._secret,
                          spec=spec, run_dir=self.run_dir, fabric_bind=bind, attach=attach, phantom=self.phantom,
                          log_level=self.card_log_level, slowdown=self.slowdown)

    def _fabric_init(self, cards) -> None:
        """Tell every card its peers' fabric endpoints and the link model."""
        peers = {str(c): h["fabric"] for c, h in self.control.hello.items() if c not in self.control.dead}
        futs = [self.control.submit(c, "fabric_init", {"peers": peers, "num_cards": self.num_devices,
                                                       **self.topology_config}) for c in cards]
        for f in futs:
            f.result(30)

    def _await_hello(self, cards, progress=None) -> None:
        cards = list(cards)
        deadline = time.monotonic() + self.start_timeout
        done = 0
        while True:
            missing = self.control.wait_hello(cards, min(deadline, time.monotonic() + 0.2))
            if progress is not None and len(cards) - len(missing) > done:
                progress(len(cards) - len(missing) - done)
                done = len(cards) - len(missing)
            dead = [c for c in cards if c in self.control.dead]
            if dead:
                raise self.control.dead[dead[0]]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise ClusterError(f"cards {sorted(missing)} did not report within {self.start_timeout:.0f} s")

    def _check_cards(self) -> dict[int, CardDied]:
        died = {}
        for card, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is not None and card not in self._expected_exit:
                how = describe_exit(rc)
                tail = proc.log_tail()
                died[card] = CardDied(card, proc.pid, how + (f"; its log ends:\n{tail}" if tail else ""))
        return died

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every card, then remove the run's segments and directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._expected_exit.update(self.procs)
        with signals_deferred():  # a Ctrl-C or SIGTERM now is taken once the run is gone, not halfway
            self._shutdown(timeout)

    def _shutdown(self, timeout: float) -> None:
        try:
            self._stop_cards(timeout)
        finally:  # also when the stop fails: nothing of the run may outlive it
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.popen.kill()
                    proc.popen.wait()
            if self.steps is not None:
                self.steps.close()
            if self.control is not None:
                self.control.close()
            if getattr(self, "_auth", None) is not None:
                self._auth.close()
            if self._ctx is not None:
                self._ctx.destroy(linger=0)
            shm.remove_run(self.run_name)
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            self._restore_sigterm()
            atexit.unregister(self.shutdown)

    def _stop_cards(self, timeout: float) -> None:
        """Ask every card that can hear it to shut down, terminate the others; wait up to ``timeout``."""
        alive = [c for c, p in self.procs.items() if p.poll() is None]
        if self.control is not None:
            told = [c for c in alive if c not in self.control.dead and c in self.control.hello]
            for c in set(alive) - set(told):  # still starting (no hello yet): it cannot hear a shutdown
                self.procs[c].popen.terminate()
            futs = [self.control.submit(c, "shutdown") for c in told]
            for f in futs:
                try:
                    f.result(timeout)
                except Exception:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                proc.popen.terminate()

    def __enter__(self) -> "Cluster":
        return self.start() if self._closed else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum, frame):
            raise SystemExit(128 + signum)  # unwinds through `with Cluster(...)`, which shuts down

        self._prev_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None

    # -- faults and restarts -----------------------------------------------------
    def kill(self, card: int, sig: int = signal.SIGKILL) -> None:
        os.kill(self.procs[card].pid, sig)

    def inject(self, card: int, kind: str, *, at_step: int = 1, seconds: float = 0.0) -> int:
        """Arm a fault on ``card``: "kill" (SIGKILL) or "pause" (``seconds``, heartbeats silent too)
        before its ``at_step``-th step from now (1: the next). Returns the card's step number it fires at."""
        fault = CardFault(kind, card, at_step, seconds)  # FaultError names a bad field here
        return self.call(card, "inject", kind=fault.kind, at_step=fault.at_step, seconds=fault.seconds)[0][
            "fires_at_step"]

    def degrade_link(self, src: int, dst: int, degradation: LinkDegradation) -> None:
        """Messages from ``src`` to ``dst`` leaving at or after ``degradation.from_ns`` (emulated) see
        the link model scaled as ``LinkDegradation.apply`` says."""
        if self.phantom:
            raise ClusterError("link faults need cards that send their messages; phantom collectives simulate "
                               "theirs in one place (interconnect.sim) and ignore per-card link faults")
        self._check_card(dst)
        self.call(src, "link_fault", dst=dst, **degradation.to_dict())

    def apply_faults(self, plan: FaultPlan) -> None:
        for f in plan.links:
            self.degrade_link(f.src, f.dst, f.degradation)
        for f in plan.cards:
            self.inject(f.card, f.kind, at_step=f.at_step, seconds=f.seconds)

    def check(self) -> None:
        """Raise the first card death the host has seen, if any."""
        if self.control.dead:
            raise next(iter(self.control.dead.values()))

    def restart(self, card: int) -> dict:
        """Start card ``card`` again; it re-attaches to its weight arena. Returns its hello."""
        old = self.procs[card]
        if old.poll() is None and card in self.control.dead:  # declared hung: it goes for good first
            old.popen.kill()
            old.popen.wait(10)
        if old.poll() is None:
            raise ClusterError(f"card {card} (pid {old.pid}) is still running; only a dead card restarts")
        self.control.forget(card, old.pid)
        self.steps.forget(card)
        with signals_deferred():
            self.procs[card] = self._spawn(card, attach=True)
        self._await_hello([card])
        self._fabric_init([c for c in range(self.num_devices) if c not in self.control.dead])
        return self.control.hello[card]

    # -- commands ------------------------------------------------------------------
    def call(self, card: int, op: str, frames=(), timeout: float | None = None, **fields):
        self._check_card(card)
        return self.control.call(card, op, fields, frames, timeout)

    def _check_card(self, card: int) -> None:
        if self._closed:
            raise ClusterError("the cluster is not running")
        if not (isinstance(card, int) and 0 <= card < self.num_devices):
            raise ClusterError(f"no card {card!r}: this cluster has cards 0..{self.num_devices - 1}")

    def status(self) -> list[dict]:
        """One dict per card: pid, state, memory_used, memory_capacity, host_rss, clock_ns, ..."""
        if self._closed:
            raise ClusterError("the cluster is not running")
        rows = []
        futs = {c: self.control.submit(c, "status") for c in range(self.num_devices)}
        for card, fut in futs.items():
            try:
                header, _ = fut.result(10)
                row = {k: v for k, v in header.items() if k not in ("op", "id", "ok")}
            except CardDied as exc:
                row = {"card": card, "pid": exc.pid, "state": "dead", "how": exc.how, "memory_used": None,
                       "memory_capacity": self.spec.memory_bytes, "host_rss": None, "clock_ns": None}
            rows.append(row)
        return rows

    def malformed(self, rows: list[dict] | None = None) -> dict:
        """Messages dropped as malformed: by the host's control plane (per reason) and by the cards'
        fabric (from ``rows``, a ``status()``, if given)."""
        out = {"control": self.control.num_malformed, "control_reasons": dict(self.control.malformed)}
        if rows is not None:
            out["fabric"] = sum(r.get("fabric_malformed") or 0 for r in rows)
        return out

    def health(self) -> dict:
        """Which cards are alive and how many messages were dropped as malformed."""
        rows = self.status()
        return {"ok": not self.control.dead, "dead_cards": {c: str(e).splitlines()[0] for c, e in
                                                             self.control.dead.items()},
                "malformed": self.malformed(rows)}

    def put(self, card: int, name: str, tensor) -> dict:
        """Place ``tensor`` (numpy or torch) into card ``card``'s arena under ``name``."""
        return self.put_async(card, name, tensor).result()[0]

    def put_async(self, card: int, name: str, tensor, tier: str | None = None):
        """``put`` without waiting: a future of the card's reply (puts to several cards overlap).
        ``tier``: a staging tier (``ddr`` or ``host``) instead of device memory."""
        self._check_card(card)
        dtype, shape, payload = wire.to_wire(tensor)
        header = {"name": name, "dtype": dtype, "shape": shape, **({"tier": tier} if tier else {})}
        return self.control.submit(card, "put", header, [payload])

    def get(self, card: int, name: str, *, as_torch: bool | None = None):
        """Read tensor ``name`` back through card ``card`` (a copy owned by the caller)."""
        header, frames = self.call(card, "get", name=name)
        buf = bytearray(frames[0].buffer) if frames else bytearray()
        want_torch = as_torch if as_torch is not None else header["dtype"] == "bfloat16"
        return wire.from_wire(buf, header["dtype"], header["shape"], as_torch=want_torch)

    def free(self, card: int, name: str) -> None:
        self.call(card, "free", name=name)

    def tensors(self, card: int) -> list[dict]:
        return self.call(card, "list")[0]["tensors"]

    def kv_init(self, card: int, layout: KVLayout) -> dict:
        return self.call(card, "kv_init", layout=layout.to_dict())[0]

    # -- collectives -----------------------------------------------------------------
    def _group(self, group) -> list[int]:
        group = list(range(self.num_devices)) if group is None else [int(c) for c in group]
        for c in group:
            self._check_card(c)
        return group

    def collective(self, kind: str, inputs: list, *, group=None, algo: str = "auto", op: str = "sum",
                   root: int = 0, timeout: float | None = None) -> dict:
        """Run one collective; ``inputs[i]`` is group member i's buffer (numpy or torch).

        Returns {"outputs": one array per member, "emu_ns": emulated time per member (its clock
        advance), "wall_ns": per member}.
        """
        group = self._group(group)
        if len(inputs) != len(group):
            raise ClusterError(f"{kind}: {len(inputs)} inputs for a group of {len(group)} cards")
        wires = [wire.to_wire(t) for t in inputs]
        dtypes = {w[0] for w in wires}
        if len(dtypes) != 1:
            raise ClusterError(f"{kind}: inputs mix dtypes {sorted(dtypes)}")
        dtype = dtypes.pop()
        futs = [self.control.submit(c, "collective", {"kind": kind, "group": group, "algo": algo, "redop": op,
                                                      "root": root, "dtype": dtype}, [w[2]])
                for c, w in zip(group, wires)]
        replies = [f.result(timeout) for f in futs]
        outs = []
        for header, frames in replies:
            buf = bytearray(frames[0].buffer)
            outs.append(wire.from_wire(buf, dtype, [len(buf) // wire.itemsize(dtype)]))
        return {"outputs": outs, "emu_ns": [h["emu_ns"] for h, _ in replies],
                "wall_ns": [h["wall_ns"] for h, _ in replies]}

    def bench_collective(self, kind: str, count: int, dtype: str = "float32", *, group=None, algo: str = "auto",
                         op: str = "sum", root: int = 0, warmup: int = 2, iters: int = 5,
                         timeout: float | None = None) -> dict:
        """Measure one collective on card-generated data: emulated time from a common clock 0 (max over
        cards), wall time per iteration (max over cards), and the number of wrong elements."""
        group = self._group(group)
        fields = {"kind": kind, "group": group, "algo": algo, "redop": op, "root": root, "dtype": dtype,
                  "count": count, "warmup": warmup, "iters": iters}
        replies = [f.result(timeout) for f in [self.control.submit(c, "collective_bench", fields) for c in group]]
        return {"emu_ns": max(h["emu_ns"] for h, _ in replies), "wall_ns": max(h["wall_ns"] for h, _ in replies),
                "wrong": None if self.phantom else sum(h["wrong"] for h, _ in replies)}


def start_with_bar(cluster: Cluster, progress: bool = True) -> Cluster:
    """``cluster.start()`` with a progress bar of the cards saying hello (on stderr, when a terminal)."""
    from tqdm import tqdm

    with tqdm(total=cluster.num_devices, desc="starting cards", unit="card", file=sys.stderr,
              disable=not (progress and sys.stderr.isatty()), leave=False) as bar:
        return cluster.start(progress=bar.update)


def _spec_or_error(name: str) -> DeviceSpec:
    try:
        return get_spec(name)
    except ValueError as exc:
        raise ClusterError(str(exc)) from None


def _is_preset(spec: DeviceSpec) -> bool:
    from devices.spec import PRESETS

    return PRESETS.get(spec.name) == spec
