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

    def run(self, plan: StepPlan, on_sent=None) -> tuple[torch.Tensor | None, int]:
        """(logits of plan.logit_rows, or None on phantom cards; emulated end of the step, ns).
        ``on_sent()``: called once the plan is on its way to every card, while they run it."""
        req_id = self.submit(plan)
        if on_sent is not None:
            on_sent()
        return self.collect(plan, req_id)

    def submit(self, plan: StepPlan, blob: bytes | None = None) -> int:
        """Send the plan to every card (``blob``: the plan already packed); the step's request id."""
        if self.broken is not None:
            raise StepFailed(self.broken)
        dead = [c for c in self.cards if c in self.cluster.control.dead]
        if dead:  # a card known to be dead fails the step now, not after a timeout
            self.broken = self.cluster.control.dead[dead[0]]
            raise StepFailed(self.broken)
        blob = plan.pack() if blob is None else blob
        try:
            return self.cluster.steps.send(self.cards, blob)
        except CardDied as exc:
            self.broken = exc
            raise StepFailed(exc) from exc

    def collect(self, plan: StepPlan, req_id: int) -> tuple[torch.Tensor | None, int]:
        steps = self.cluster.steps
        replies, failure = steps.gather(req_id, self.cards)
        if failure is not None:
            self._fail(req_id, replies, failure)
        steps.discard(req_id)
        end = max(h["clock_ns"] for h, _ in replies.values())
        if self.phantom or not plan.logit_rows:
            return None, end
        header, frames = replies[self.cards[plan.output_rank]]
        logits = torch.frombuffer(bytearray(frames[0].buffer), dtype=torch.float32).view(*header["shape"])
        return logits, end

    def _fail(self, req_id: int, replies: dict, exc: Exception):
        """Stop the others at once (they may wait for the failed card inside a collective), give them
        ``ABORT_GRACE_S`` to answer, then fail the step."""
        self.broken = exc
        control, steps = self.cluster.control, self.cluster.steps
        left = [c for c in self.cards if c not in replies]
        for card in left:
            if card not in control.dead:
                control.notify(card, "abort", {"reason": str(exc).splitlines()[0]})
        steps.gather(req_id, left, timeout=ABORT_GRACE_S, stop_on_error=False)
        steps.discard(req_id)
        dead = [c for c in self.cards if c in control.dead]
        if dead and not isinstance(exc, CardDied):  # a peer's error ("card 1 died") came first: name the cause
            exc = self.broken = control.dead[dead[0]]
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
