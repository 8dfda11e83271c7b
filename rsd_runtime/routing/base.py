"""What a routing policy sees: the request, and the router's view of each worker."""
from __future__ import annotations

from dataclasses import dataclass, field


class NoWorker(RuntimeError):
    """No healthy worker can take the request."""


@dataclass(slots=True)
class RouteRequest:
    tokens: list[int] | None = None  # prompt token ids, when known
    text: str | None = None  # prompt text, when the router has no tokenizer
    session: str | None = None  # x-session-id header or the OpenAI `user` field
    request_id: str | None = None

    @property
    def key(self) -> tuple | str:
        """What prefixes are matched on: token ids if given, else characters."""
        return tuple(self.tokens) if self.tokens is not None else (self.text or "")


@dataclass(slots=True)
class WorkerState:
    name: str
    healthy: bool = True
    outstanding: int = 0  # requests the router sent it that have not finished
    served: int = 0
    extra: dict = field(default_factory=dict)


class Policy:
    name = "base"

    def choose(self, req: RouteRequest, workers: list[WorkerState]) -> int:
        raise NotImplementedError

    def on_dispatch(self, req: RouteRequest, worker: WorkerState) -> None:
        """The request went to ``worker`` (bookkeeping, e.g. a prefix tree)."""

    def on_finish(self, req: RouteRequest, worker: WorkerState) -> None:
        """The request finished (or failed) on ``worker``."""

    @staticmethod
    def healthy(workers: list[WorkerState]) -> list[int]:
        ok = [i for i, w in enumerate(workers) if w.healthy]
        if not ok:
            raise NoWorker(f"none of the {len(workers)} workers is healthy")
        return ok
