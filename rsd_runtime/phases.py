"""Phases of a run timed on the wall clock and logged as they end (``rsd-launch -v`` shows them)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager


@contextmanager
def phase(log: logging.Logger, name: str, times: dict | None = None, key: str | None = None):
    """Time the block; log its start at debug level and its wall time at info level. With ``times``,
    also record the seconds under ``key``."""
    log.debug("%s ...", name)
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    if times is not None:
        times[key or name] = seconds
    log.info("%s: %.3f s", name, seconds)
