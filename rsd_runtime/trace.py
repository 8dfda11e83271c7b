"""A Chrome / Perfetto trace of a run on the emulated clock (``--trace FILE.json``).

The Trace Event Format (the JSON object form: ``{"traceEvents": [...]}``),
which ui.perfetto.dev and chrome://tracing open:

* process 0 is the host (-i the host of instance i of a rack): its steps (one span per step, on the cards' clock from
  the plan's start to the slowest card's end), its own work when host costs are
  on (preparing a step, sampling, detokenising);
* process 1 + c is card c, with one thread per engine: ``compute`` (every
  launch: an op, or a fused group, with its FLOPs and bytes) and
  ``data movement`` (every collective, with its bytes per card);
* flow arrows join each card's part of a collective to the next card's in the
  group (the ring order), as the messages go.

Times are the emulated clock's integer nanoseconds, written in microseconds
(``ts``, ``dur``) as the format wants; ``displayTimeUnit`` is ``ns``. The spans
of a step come from the in-process simulation of the instance
(``rsd_runtime.sim_runner``), which charges what the cards charge (tested step
by step against card processes).
"""
from __future__ import annotations

import json

from devices.schedule import COMPUTE

HOST_PID = 0
THREADS = {"compute": 1, "dma": 2, "steps": 1, "host": 2, "api": 3}
_LABEL = {(False, 1): "compute", (False, 2): "data movement", (True, 1): "steps", (True, 2): "host: schedule, "
          "prepare, sample", (True, 3): "host: API, detokenise"}


def _us(ns: float) -> float:
    return ns / 1000.0


class Trace:
    def __init__(self):
        self.events: list[dict] = []
        self._named: set[tuple] = set()
        self._flows = 0
        self.step_index = 0

    def _track(self, pid: int, tid: int) -> None:
        if (pid, tid) in self._named:
            return
        if not any(p == pid for p, _ in self._named):
            name = f"card {pid - 1}" if pid > 0 else "host" if pid == HOST_PID else f"host of instance {-pid}"
            self.events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
            self.events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                                "args": {"sort_index": pid}})
        self._named.add((pid, tid))
        self.events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                            "args": {"name": _LABEL[(pid <= HOST_PID, tid)]}})

    def span(self, pid: int, tid: int, name: str, start: int, end: int, cat: str, **args) -> dict:
        self._track(pid, tid)
        ev = {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": _us(start), "dur": _us(end - start),
              "args": {"step": self.step_index, **args}}
        self.events.append(ev)
        return ev

    # -- what the simulation reports -------------------------------------------------------
    def on_compute(self, card: int, task, start: int, step, prog) -> None:
        t = start
        for s in prog.spans(task.ops, step):
            self.span(1 + card, THREADS["compute"], s.name, t, t + s.ns, s.kind, flops=s.flops, bytes=s.bytes,
                      spill_bytes=s.spill, chunk=task.chunk)
            t += s.ns

    def on_collective(self, cards: list[int], task, starts: list[int], ends: list[int], call) -> None:
        n = len(cards)
        for card, a, b in zip(cards, starts, ends):
            self.span(1 + card, THREADS["dma"], call.kind, a, b, call.kind, bytes=call.count, chunk=task.chunk)
        if n < 2:
            return
        for r in range(n):  # ring neighbours: r sends to r + 1
            q = (r + 1) % n
            self._flows += 1
            self.events.append({"ph": "s", "id": self._flows, "name": call.kind, "cat": "fabric",
                                "pid": 1 + cards[r], "tid": THREADS["dma"], "ts": _us(starts[r])})
            self.events.append({"ph": "f", "bp": "e", "id": self._flows, "name": call.kind, "cat": "fabric",
                                "pid": 1 + cards[q], "tid": THREADS["dma"], "ts": _us(max(starts[q], starts[r]))})

    # -- what the engine reports -------------------------------------------------------------
    def step(self, kind: str, start: int, end: int, host_pid: int = HOST_PID, **args) -> None:
        self.span(host_pid, THREADS["steps"], kind, start, end, "step", **args)
        self.step_index += 1

    def host(self, name: str, start: int, end: int, api: bool = False, host_pid: int = HOST_PID) -> None:
        if end > start:
            self.span(host_pid, THREADS["api" if api else "host"], name, start, end, "host")

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ns",
                       "otherData": {"clock": "emulated", "unit": "ns (ts and dur in us as the format wants)"}}, f)


class SimTracer:
    """Feeds a Trace from a ``SimRunner`` walk (its ``tracer`` hook)."""

    def __init__(self, trace: Trace, cards: list[int]):
        self.trace, self.cards = trace, cards

    def on_task(self, task, starts: list[int], ends: list[int], step, progs, call=None) -> None:
        if task.engine == COMPUTE:
            for card, start, prog in zip(self.cards, starts, progs):
                self.trace.on_compute(card, task, start, step, prog)
        else:
            self.trace.on_collective(self.cards, task, starts, ends, call)
