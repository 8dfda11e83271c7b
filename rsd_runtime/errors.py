"""Errors the host raises about its cards."""
from __future__ import annotations


class ClusterError(RuntimeError):
    """The cluster cannot be started or used as asked."""


class CardError(RuntimeError):
    """A command failed on a card; the card itself is still alive."""

    def __init__(self, card: int, op: str, message: str, kind: str = ""):
        self.card, self.op, self.kind = card, op, kind
        super().__init__(f"card {card}: {op} failed: {message}")


class EngineDeadError(RuntimeError):
    """A step failed on the cards; the engine takes no work until ``recover()``."""


class CardDied(ClusterError):
    """A card process ended (or stopped answering) while the cluster was up."""

    def __init__(self, card: int, pid: int | None, how: str):
        self.card, self.pid, self.how = card, pid, how
        super().__init__(f"card {card} (pid {pid}) {how}")
