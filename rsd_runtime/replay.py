"""A rack replayed on the emulated clock: a router and K engines as one discrete-event loop.

    rack = Replay([engine_0, ..., engine_k], get_policy("least-outstanding"))
    records = rack.run([ReplayRequest(arrival_ns, prompt_ids, max_tokens), ...])

Events sit in a heap of (time, kind, tie, payload), popped in order; at equal
times a step's end is handled before an arrival, and an arrival before the
start of a step, so a request that arrives exactly when a step ends joins the
next one; remaining ties go by instance or request index. So a replay repeats
exactly.

* An arrival goes through the routing policy, which sees the router's view of
  the instances at that moment (requests in flight on each, health), as the
  live router does; the same policy objects serve both. The router hop costs
  ``router_hop_ns`` of emulated time before the request reaches its instance.
* An instance steps while it has work: a step's outputs (tokens, finished
  requests) become visible at the step's emulated end; an idle instance jumps
  to its next arrival.
* Engines may run on card processes or in this process (``backend="sim"``);
  their emulated figures are the same.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from rsd_runtime.routing import Policy, RouteRequest, WorkerState
from rsd_runtime.sampling import SamplingParams

# event kinds, in the order they are handled at equal times
STEP_END, ARRIVAL, REACH, START = 0, 1, 2, 3


@dataclass(slots=True)
class ReplayRequest:
    arrival_ns: int
    prompt: list[int]
    max_tokens: int
    session: str | None = None
    model: str | None = None  # for an engine that serves several (``CoEEngine``)


@dataclass(slots=True)
class RequestRecord:
    """One request's life on the emulated clock, in ns."""
    index: int
    instance: int
    arrival_ns: int
    prompt_len: int
    token_ns: list[int] = field(default_factory=list)  # when each output token was out
    end_ns: int | None = None
    finish_reason: str | None = None

    @property
    def output_len(self) -> int:
        return len(self.token_ns)


class Replay:
    def __init__(self, engines: list, policy: Policy, *, router_hop_ns: int = 0, names: list[str] | None = None):
        if not engines:
            raise ValueError("a rack needs at least one instance")
        self.engines = engines
        self.policy = policy
        self.router_hop_ns = int(router_hop_ns)
        self.workers = [WorkerState(n) for n in (names or [f"instance{i}" for i in range(len(engines))])]
        self.steps = [0] * len(engines)

    def run(self, requests: list[ReplayRequest], progress=None) -> list[RequestRecord]:
        """Replay every request; one record per request, in request order. ``progress(n)`` is called
        as requests finish."""
        self._heap, self._count = [], 0
        for i, r in enumerate(requests):
            if r.arrival_ns < 0:
                raise ValueError(f"request {i}: arrival time {r.arrival_ns} ns is negative")
            self._push(r.arrival_ns, ARRIVAL, i)
        records: list[RequestRecord | None] = [None] * len(requests)
        routed: dict[int, RouteRequest] = {}
        busy = [False] * len(self.engines)
        pending: list[list] = [[] for _ in self.engines]
        while self._heap:
            now, kind, tie, _, k = heapq.heappop(self._heap)
            if kind == ARRIVAL:
                req = requests[tie]
                rr = RouteRequest(tokens=req.prompt, session=req.session, request_id=str(tie))
                k = self.policy.choose(rr, self.workers)
                self.policy.on_dispatch(rr, self.workers[k])
                self.workers[k].outstanding += 1
                routed[tie] = rr
                records[tie] = RequestRecord(tie, k, req.arrival_ns, len(req.prompt))
                self._push(now + self.router_hop_ns, REACH, tie, k)
            elif kind == REACH:
                req = requests[tie]
                params = SamplingParams(max_tokens=req.max_tokens, temperature=0, ignore_eos=True)
                which = {} if req.model is None else {"model": req.model}
                self.engines[k].add_request(tie, req.prompt, params, emu_arrival=now, **which)
                if not busy[k]:
                    self._push(now, START, k, k)
            elif kind == START:
                engine = self.engines[k]
                if busy[k] or not engine.has_unfinished():
                    continue
                busy[k] = True
                engine.emu_now = max(engine.emu_now, now)
                pending[k] = engine.step()
                self.steps[k] += 1
                self._push(engine.emu_now, STEP_END, k, k)
            else:  # STEP_END: the step's tokens are out now
                busy[k] = False
                for out in pending[k]:
                    rec = records[out.request_id]
                    rec.token_ns += [out.emu_time_ns] * len(out.token_ids)
                    if out.finished:
                        rec.end_ns, rec.finish_reason = out.emu_time_ns, out.finish_reason
                        self.workers[k].outstanding -= 1
                        self.workers[k].served += 1
                        self.policy.on_finish(routed.pop(out.request_id), self.workers[k])
                        if progress is not None:
                            progress(1)
                pending[k] = []
                if self.engines[k].has_unfinished():
                    self._push(now, START, k, k)
        return records

    def _push(self, at: int, kind: int, tie: int, instance: int | None = None) -> None:
        self._count += 1
        heapq.heappush(self._heap, (at, kind, tie, self._count, instance))
