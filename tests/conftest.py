"""Shared fixtures: an isolated shm prefix per session, and a leak check after every test."""
from __future__ import annotations

import secrets
import time

import psutil
import pytest

from devices import shm

PREFIX = "rt" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def shm_prefix() -> str:
    return PREFIX


def run_leftovers(prefix: str = PREFIX) -> list[str]:
    return sorted(p.name for p in shm.SHM_DIR.glob(f"{prefix}_*"))


def card_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "devices" in p.cmdline():
                out.append(p)
        except psutil.Error:
            pass
    return out


def wait_until(pred, timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture(autouse=True)
def no_leaks(request):
    """After every test: no new segment of this session's runs, no new card process.

    Tests on a shared (module-scoped) cluster add segments to it, and those marked ``restarts_cards``
    add card processes to it; its teardown checks them.
    """
    cards_before = {p.pid for p in card_children()}
    segs_before = set(run_leftovers())
    yield
    if request.node.get_closest_marker("restarts_cards"):
        return
    assert wait_until(lambda: not [p for p in card_children() if p.pid not in cards_before], 5.0), \
        f"card processes survived: {card_children()}"
    if "module_cluster" in request.fixturenames:
        return
    assert wait_until(lambda: set(run_leftovers()) <= segs_before, 2.0), \
        f"segments left in {shm.SHM_DIR}: {sorted(set(run_leftovers()) - segs_before)}"


def assert_no_leaks() -> None:
    """Nothing at all of this session's runs: for teardowns of shared clusters and killed runs."""
    assert wait_until(lambda: not card_children(), 5.0), f"card processes survived: {card_children()}"
    assert run_leftovers() == [], f"segments left in {shm.SHM_DIR}: {run_leftovers()}"
