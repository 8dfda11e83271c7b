"""A card's lifeline to its host: when the host process is gone, the card cleans up and exits.

The card watches the host's pid itself (a pidfd on Linux, polling elsewhere),
not PR_SET_PDEATHSIG: that signal follows the thread that created the child,
so a host that starts its cards from a short-lived thread would lose them when
the thread ends. With the host gone nobody else removes the run's segments
and its run directory, so the card does it before it exits.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import threading

import psutil

from devices.shm import remove_run
from interconnect.segment import CREATE_LOCK

log = logging.getLogger("rsd.card")
EXIT_HOST_GONE = 3
POLL_S = 0.2  # without a pidfd: how often the host's pid is looked at


def host_alive(pid: int, create_time: float | None) -> bool:
    """``pid`` still names the host (not a reused pid of a later process)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (create_time is None or proc.create_time() == create_time)
    except psutil.NoSuchProcess:
        return False


def wait_for_exit(pid: int, stop: threading.Event) -> bool:
    """Block until process ``pid`` ends (True) or ``stop`` is set (False)."""
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return True
    fd = None
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
    try:
        while not stop.is_set():
            if fd is not None:
                ready, _, _ = select.select([fd], [], [], POLL_S)
                if ready:
                    return True
            elif stop.wait(POLL_S):
                return False
            if not host_alive(pid, create_time):  # also the reaped-zombie case a pidfd reports late
                return True
        return False
    finally:
        if fd is not None:
            os.close(fd)


def clean_up_run(run: str, run_dir: str | None) -> None:
    """Remove what a run leaves behind when its host cannot: segments, then the run directory."""
    remove_run(run)
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def watch_host(pid: int, run: str, run_dir: str | None, card: int) -> threading.Event:
    """Start a daemon thread that ends this process, cleaning up, once the host ``pid`` is gone.

    Returns an event that stops the watch (a card that shuts down normally sets it)."""
    stop = threading.Event()

    def watch():
        if wait_for_exit(pid, stop):
            log.error("card %d: host (pid %d) is gone; removing run %s and exiting", card, pid, run)
            CREATE_LOCK.acquire()  # never released: a card still starting up creates no segment after this
            clean_up_run(run, run_dir)
            os._exit(EXIT_HOST_GONE)

    threading.Thread(target=watch, name="rsd-lifeline", daemon=True).start()
    return stop
