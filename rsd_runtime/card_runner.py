"""Running step plans on one instance's cards, and putting them back in step after a failure.

The plan is packed once and the same bytes go to every card; each card runs its
stream and reduces with its peers directly, and the output rank returns the
logits of the rows that sample. A step ends, on the emulated clock, when its
slowest card finishes.

If any card fails a step (it died, hung, or refused the plan), the others are
told to abort at once instead of waiting for it inside a collective, and the
runner stays unusable until ``resync()`` has put every card of the run into a
new fabric epoch.
"""
from __future__ import annotations

import itertools
from concurrent.futures import wait

import torch

from devices.step import StepPlan
from rsd_runtime.errors import CardDied, CardError, ClusterError

ABORT_GRACE_S = 5.0  # how long the other cards get to answer an abort


class StepFailed(ClusterError):
    """A step did not complete on every card; the cause is the first card's error."""

    def __init__(self, cause: Exception):
        self.cause = cause
        super().__init__(str(cause))


class CardRunner:
    _epochs = itertools.count(1)

    def __init__(self, cluster, cards: list[int], *, vocab_size: int):
        self.cluster = cluster
        self.cards = list(cards)
        self.vocab_size = vocab_size
        self.phantom = cluster.phantom
        self.broken: Exception | None = None  # set by a failed step until resync()

    def run(self, plan: StepPlan) -> tuple[torch.Tensor | None, int]:
        """(logits of plan.logit_rows, or None on phantom cards; emulated end of the step, ns)."""
        return self.collect(plan, self.submit(plan))

    def submit(self, plan: StepPlan, blob: bytes | None = None) -> list:
        """Send the plan to every card (``blob``: the plan already packed); futures of their replies."""
        if self.broken is not None:
            raise StepFailed(self.broken)
        dead = [c for c in self.cards if c in self.cluster.control.dead]
        if dead:  # a card known to be dead fails the step now, not after a timeout
            self.broken = self.cluster.control.dead[dead[0]]
            raise StepFailed(self.broken)
        blob = plan.pack() if blob is None else blob
        return [self.cluster.control.submit(c, "step", None, [blob]) for c in self.cards]

    def collect(self, plan: StepPlan, futs: list) -> tuple[torch.Tensor | None, int]:
        wait(futs, return_when="FIRST_EXCEPTION")
        failed = [f for f in futs if f.done() and f.exception() is not None]
        if failed:
            self._fail(futs, failed[0].exception())
        replies = [f.result() for f in futs]
        end = max(h["clock_ns"] for h, _ in replies)
        if self.phantom or not plan.logit_rows:
            return None, end
        header, frames = replies[plan.output_rank]
        logits = torch.frombuffer(bytearray(frames[0].buffer), dtype=torch.float32).view(*header["shape"])
        return logits, end

    def _fail(self, futs, exc: Exception):
        self.broken = exc
        control = self.cluster.control
        for card, fut in zip(self.cards, futs):
            if not fut.done():
                control.notify(card, "abort", {"reason": str(exc).splitlines()[0]})
        wait(futs, timeout=ABORT_GRACE_S)
        raise StepFailed(exc) from exc

    def resync(self) -> None:
        """Every card of the instance enters a new fabric epoch: its collectives start afresh, together."""
        epoch = next(self._epochs)
        control = self.cluster.control
        futs = [control.submit(c, "resync", {"epoch": epoch}) for c in self.cards if c not in control.dead]
        for f in futs:
            f.result(30)
        self.broken = None


def failure_kind(exc: Exception) -> str:
    """How a step failed, for logs and metrics: card_died, card_error or other."""
    cause = exc.cause if isinstance(exc, StepFailed) else exc
    return "card_died" if isinstance(cause, CardDied) else "card_error" if isinstance(cause, CardError) else "other"
