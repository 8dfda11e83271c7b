"""Layer pipelining (``--overlap on``): how many row chunks each step's layers run in.

Cutting a step into chunks lets the all_reduce of chunk i run on the
data-movement engine while the compute engine works on chunk i+1
(``devices.schedule``), but each chunk pays its own launches, its own collective
latencies and, where a matmul is memory-bound, reads the weights again. So the
compiler prices every candidate on the emulated clock before it commits: it
runs the step in this process (``rsd_runtime.sim_runner``) from idle cards for
1, 2, 4 and 8 chunks and keeps the fastest (the fewest chunks on a tie). A step
starts with every card and port idle (the host sends it after the slowest card
answered the step before), so that figure is exactly what the cards will
charge: overlap never makes a step slower.

``overlap=k`` (a whole number) forces k chunks on every step that has k rows,
whatever it costs: for studies and tests of the schedule itself.
"""
from __future__ import annotations

from dataclasses import replace

from devices.step import MAX_CHUNKS, StepPlan

OVERLAP = ("off", "on")
CANDIDATES = (1, 2, 4, 8)


def parse_overlap(value) -> tuple[int, ...] | None:
    """The chunk counts a step may use: None (off), the candidates (on) or (k,) for a forced k."""
    if value in (True, "on"):
        return CANDIDATES
    if value in (False, None, "off"):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if isinstance(value, bool) or not 1 <= k <= MAX_CHUNKS or str(k) != str(value).strip():
        raise ValueError(f"overlap must be 'on', 'off' or a number of chunks 1..{MAX_CHUNKS}, got {value!r}")
    return (k,)


class Pipeliner:
    def __init__(self, runner, candidates=CANDIDATES):
        """``runner``: a ``SimRunner`` of the instance (its own state, not the one that runs steps)."""
        self.runner = runner
        self.candidates = candidates
        self._choice: dict[tuple, int] = {}
        self.last: dict[int, int] = {}  # chunks -> emulated ns of the last step priced

    def price(self, plan: StepPlan, chunks: int) -> int:
        """Emulated ns of ``plan`` run in ``chunks`` chunks from idle cards."""
        r = self.runner
        r.clocks, r.ports = [0] * len(r.cards), [(0, 0)] * len(r.cards)
        _, end = r.run(replace(plan, t_start=0, chunks=chunks, token_ids=None))
        return end

    def choose(self, plan: StepPlan) -> int:
        if len(self.candidates) == 1:  # forced
            return max(1, min(self.candidates[0], plan.num_tokens))
        key = (tuple((s.num_tokens, s.start) for s in plan.seqs), len(plan.logit_rows))
        got = self._choice.get(key)
        if got is None:
            times = {k: self.price(plan, k) for k in self.candidates if k <= plan.num_tokens} or {1: 0}
            got = min(times, key=lambda k: (times[k], k))
            if len(times) > 1:
                self.last = times
            if len(self._choice) > 4096:
                self._choice.clear()
            self._choice[key] = got
        return got

    def apply(self, plan: StepPlan) -> StepPlan:
        k = self.choose(plan)
        return plan if k == plan.chunks else replace(plan, chunks=k)
