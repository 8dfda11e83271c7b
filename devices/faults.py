"""Fault injection for experiments and tests: kill or pause a card at a step, degrade a link.

    plan = FaultPlan.parse(["kill:card=2:step=5", "pause:card=1:step=3:seconds=1",
                            "link:src=0:dst=1:bw=0.5:lat_us=2:from_ns=0"])
    cluster.apply_faults(plan)

A card fault is armed on the card itself (``CardFaults``) and fires before the
card runs its ``step``-th step counted from when it was armed (1 = the next
step): ``kill`` ends the process with SIGKILL, as a crash would; ``pause``
stops the card for ``seconds`` of wall time, heartbeats included, as a hung
card would. A link fault (``interconnect.links.LinkDegradation``) changes the
sending card's port clock for messages to ``dst`` that leave at or after
emulated time ``from_ns``.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

from interconnect.links import LinkDegradation

CARD_FAULTS = ("kill", "pause")
MAX_PAUSE_S = 3600.0


class FaultError(ValueError):
    """A fault that cannot be injected as written."""


@dataclass(slots=True, frozen=True)
class CardFault:
    kind: str  # "kill" | "pause"
    card: int
    at_step: int = 1  # fires before the card's at_step-th step from arming (1: the next one)
    seconds: float = 0.0  # pause only

    def __post_init__(self):
        if self.kind not in CARD_FAULTS:
            raise FaultError(f"unknown card fault {self.kind!r}; known: {', '.join(CARD_FAULTS)}")
        if not isinstance(self.card, int) or isinstance(self.card, bool) or self.card < 0:
            raise FaultError(f"{self.kind}: card must be an int >= 0, got {self.card!r}")
        if not isinstance(self.at_step, int) or isinstance(self.at_step, bool) or self.at_step < 1:
            raise FaultError(f"{self.kind}: step must be an int >= 1, got {self.at_step!r}")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) \
                or not 0 <= self.seconds <= MAX_PAUSE_S:
            raise FaultError(f"{self.kind}: seconds must be in [0, {MAX_PAUSE_S:.0f}], got {self.seconds!r}")
        if self.kind == "pause" and self.seconds <= 0:
            raise FaultError("pause: seconds must be > 0")


@dataclass(slots=True, frozen=True)
class LinkFault:
    src: int
    dst: int
    degradation: LinkDegradation


@dataclass(slots=True)
class FaultPlan:
    cards: list[CardFault] = field(default_factory=list)
    links: list[LinkFault] = field(default_factory=list)

    @classmethod
    def parse(cls, specs: list[str]) -> "FaultPlan":
        """From ``--inject`` strings: ``kind:key=value:...``; FaultError names the bad part."""
        plan = cls()
        for spec in specs:
            kind, *parts = spec.split(":")
            kv = {}
            for part in parts:
                key, sep, value = part.partition("=")
                if not sep or not key:
                    raise FaultError(f"--inject {spec!r}: {part!r} is not key=value")
                kv[key] = value
            try:
                plan.add(kind, kv)
            except (FaultError, ValueError) as exc:
                raise FaultError(f"--inject {spec!r}: {exc}") from None
        return plan

    def add(self, kind: str, kv: dict[str, str]) -> None:
        allowed = {"kill": {"card", "step"}, "pause": {"card", "step", "seconds"},
                   "link": {"src", "dst", "bw", "lat_us", "lat_ns", "from_ns"}}
        if kind not in allowed:
            raise FaultError(f"unknown fault {kind!r}; known: {', '.join(allowed)}")
        unknown = set(kv) - allowed[kind]
        if unknown:
            raise FaultError(f"{kind} takes {', '.join(sorted(allowed[kind]))}; not {', '.join(sorted(unknown))}")
        if kind == "link":
            for key in ("src", "dst"):
                if key not in kv:
                    raise FaultError(f"link needs {key}=")
            added = _int(kv, "lat_ns", 0) + round(_float(kv, "lat_us", 0.0) * 1000)
            self.links.append(LinkFault(_int(kv, "src", 0), _int(kv, "dst", 0), LinkDegradation(
                _float(kv, "bw", 1.0), added, _int(kv, "from_ns", 0))))
            return
        if "card" not in kv:
            raise FaultError(f"{kind} needs card=")
        self.cards.append(CardFault(kind, _int(kv, "card", 0), _int(kv, "step", 1), _float(kv, "seconds", 0.0)))

    def describe(self) -> list[str]:
        out = [f"{f.kind} card {f.card} before its step {f.at_step}" + (f" for {f.seconds:g} s" if f.seconds else "")
               for f in self.cards]
        out += [f"link {f.src}->{f.dst}: bandwidth x{f.degradation.bw_factor:g}, latency "
                f"+{f.degradation.added_latency_ns} ns from emulated {f.degradation.from_ns} ns" for f in self.links]
        return out


def _int(kv: dict, key: str, default: int) -> int:
    try:
        return int(kv[key]) if key in kv else default
    except ValueError:
        raise FaultError(f"{key}={kv[key]!r} is not an integer") from None


def _float(kv: dict, key: str, default: float) -> float:
    try:
        return float(kv[key]) if key in kv else default
    except ValueError:
        raise FaultError(f"{key}={kv[key]!r} is not a number") from None


class CardFaults:
    """The faults armed on one card; ``before_step`` runs at the start of every step."""

    def __init__(self):
        self.armed: list[tuple[int, CardFault]] = []  # (step number that fires it, fault)
        self.steps = 0
        self.paused = threading.Event()  # set while paused: the heartbeat thread stays silent

    def arm(self, fault: CardFault) -> None:
        self.armed.append((self.steps + fault.at_step, fault))

    def before_step(self) -> None:
        self.steps += 1
        due = [f for n, f in self.armed if n == self.steps]
        self.armed = [(n, f) for n, f in self.armed if n > self.steps]
        for fault in due:
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            self.paused.set()
            try:
                time.sleep(fault.seconds)
            finally:
                self.paused.clear()
