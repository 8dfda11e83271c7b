"""Named shared-memory segments under /dev/shm, their names, and the sweep.

Segments are plain tmpfs files mapped with mmap, not
``multiprocessing.shared_memory``: the latter registers every segment with a
resource tracker that unlinks it when the creating process exits, which would
destroy a card's weights exactly when they must outlive it (a card restarted
after a crash re-attaches to them). The host owns the names and removes them.

Names: ``<prefix>_<host pid>_<token>_<what>``. The host pid lets a later launch
tell a run whose owner is gone (its segments are stale and swept) from a live
one (left alone). tmpfs files are sparse: a segment sized to a card's whole
emulated memory costs only the pages actually written.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from interconnect.segment import SHM_DIR, Segment, SegmentError  # noqa: F401 (re-exported)

DEFAULT_PREFIX = os.environ.get("RSD_SHM_PREFIX", "rsd")
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,15}$")


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"shm prefix {prefix!r} must be 1-16 letters/digits starting with a letter")
    return prefix


def new_run_name(prefix: str = DEFAULT_PREFIX) -> str:
    """A fresh run name: ``<prefix>_<host pid>_<8 hex>``."""
    return f"{check_prefix(prefix)}_{os.getpid()}_{secrets.token_hex(4)}"


def segment_name(run: str, card: int, kind: str) -> str:
    return f"{run}_c{card:03d}_{kind}"


def host_shm_free() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def run_segments(run: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{run}_*"))


def remove_run(run: str) -> list[str]:
    """Unlink every segment of ``run``; returns the names removed."""
    removed = []
    for p in run_segments(run):
        try:
            p.unlink()
            removed.append(p.name)
        except FileNotFoundError:
            pass
    return removed


_NAME_RE = re.compile(r"^(?P<run>(?P<prefix>[A-Za-z][A-Za-z0-9]*)_(?P<pid>\d+)_(?P<token>[0-9a-f]{8}))_.+$")


@dataclass(slots=True)
class SweepReport:
    removed: dict[str, list[str]] = field(default_factory=dict)  # stale run -> names removed
    live: dict[str, list[str]] = field(default_factory=dict)  # run of a live owner -> names
    foreign: list[str] = field(default_factory=list)  # our prefix, not our kind of name or owner
    dirs: list[str] = field(default_factory=list)  # run directories of stale runs (removed)


def _owner_alive(pid: int, mtime: float) -> bool:
    try:
        proc = psutil.Process(pid)
        # A pid reused by a process started after the segment was last written is not its owner.
        return proc.create_time() <= mtime + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return psutil.pid_exists(pid)


def sweep(prefix: str = DEFAULT_PREFIX, *, dry_run: bool = False) -> SweepReport:
    """Remove segments of runs whose owner process is gone.

    Segments of live runs are left alone; names that carry our prefix but are
    not ours (other grammar, other user) are reported as foreign, never touched.
    """
    report = SweepReport()
    uid = os.getuid()
    for p in sorted(SHM_DIR.glob(f"{check_prefix(prefix)}_*")):
        m = _NAME_RE.match(p.name)
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if m is None or m["prefix"] != prefix or st.st_uid != uid:
            report.foreign.append(p.name)
            continue
        run = m["run"]
        if _owner_alive(int(m["pid"]), st.st_mtime):
            report.live.setdefault(run, []).append(p.name)
            continue
        if not dry_run:
            p.unlink(missing_ok=True)
        report.removed.setdefault(run, []).append(p.name)
    report.dirs = sweep_run_dirs(prefix, dry_run=dry_run)
    return report


_DIR_RE = re.compile(r"^(?P<run>(?P<prefix>[A-Za-z][A-Za-z0-9]*)_(?P<pid>\d+)_(?P<token>[0-9a-f]{8}))-[^/]+$")


def run_dir_root() -> Path:
    """Where hosts make their run directories (sockets, card logs)."""
    return Path(tempfile.gettempdir())


def sweep_run_dirs(prefix: str = DEFAULT_PREFIX, *, dry_run: bool = False) -> list[str]:
    """Remove this user's run directories whose host is gone; returns their paths."""
    removed = []
    for p in sorted(run_dir_root().glob(f"{check_prefix(prefix)}_*-*")):
        m = _DIR_RE.match(p.name)
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if m is None or m["prefix"] != prefix or st.st_uid != os.getuid() or not p.is_dir() or p.is_symlink():
            continue
        if _owner_alive(int(m["pid"]), st.st_mtime):
            continue
        if not dry_run:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(str(p))
    return removed
