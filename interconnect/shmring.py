"""Small messages between processes of one host through shared-memory rings and a doorbell.

Each receiver owns one inbox segment (mode 0600, named after the run, so only the
run's processes reach it). The inbox holds one single-producer single-consumer
ring per sender slot and one doorbell word that every sender rings, so the
receiver waits on a single thing::

    0     magic, num_slots, ring_bytes, receiver pid, doorbell (u32), unused (u32)
    64    heads[num_slots]   u64, bytes ever written into ring i (its sender writes it)
          tails[num_slots]   u64, bytes ever read from ring i (the receiver writes it)
          pids[num_slots]    u64, pid of the sender attached to slot i
          board              BOARD_GROUPS x 2 entries of BOARD_WORDS u64 (the receiver writes it, see ``Board``)
          board data         BOARD_GROUPS x 2 areas of BOARD_DATA_BYTES (the receiver writes it, see ``Board``)
          rings              num_slots x ring_bytes

A record is ``[u32 header length][u32 payload length][header][payload]``, padded
to 8 bytes; a record that does not fit before the end of the ring is preceded by
a wrap mark and starts again at offset 0. The sender copies the record in, then
publishes the new head (x86 keeps stores in order), then always bumps the
doorbell atomically and wakes the receiver if it sleeps (``FUTEX_WAKE_OP``: add
and wake in one system call). The receiver reads the doorbell, looks at the
rings once more and sleeps only while the doorbell still holds that value. The
bump is a locked instruction, a full barrier after the head: a receiver that
read the old doorbell is woken, one that read the new one sees the head. (A
sender that skipped the call when a "receiver sleeps" flag looked clear could
miss a receiver whose flag store was still in its store buffer: x86 lets a
later load pass an earlier store; measured, about 2% of the waits of a 4 KiB
all_reduce lost their wake-up that way and slept a whole slice.)

Waiting spins with ``sched_yield`` for a few tens of microseconds (a peer's answer
usually comes that fast), then sleeps on the doorbell in 100 ms slices; between
slices the caller checks that the peer it waits on is alive.
"""
from __future__ import annotations

import ctypes
import os
import platform
import struct
import time

import numpy as np

from interconnect.segment import Segment

MAGIC = 0x7273_6472_696E_6731  # "rsdring1"
HEADER = 64
ALIGN = 8
WRAP = 0xFFFF_FFFF
RECORD = struct.Struct("<II")
RING_BYTES = 256 << 10  # per sender: a few hundred small messages in flight
# How long a waiting receiver polls before it sleeps. Measured with 4 cards on 2 busy cores
# (4 KiB all_reduce, wall per call): 0 -> ~0.95 ms, 20 us -> ~2.2 ms, 50 us -> ~2.4 ms: with more
# processes than cores a spinning receiver only keeps its sender off the core.
SPIN_S = float(os.environ.get("RSD_RING_SPIN_S", "0"))
SLICE_S = 0.1  # sleep slices between liveness checks
FIRST_SLICE_S = 0.002  # the first sleep of a wait, before the liveness checks of every later slice begin

# The rings rely on x86-64: stores become visible in program order (TSO) and the futex call number.
SUPPORTED = platform.machine() in ("x86_64", "AMD64")
_SYS_FUTEX = 202  # x86-64 syscall number (arch/x86/entry/syscalls/syscall_64.tbl)
_FUTEX_WAIT, _FUTEX_WAKE_OP = 0, 5
_WAKE_ADD_ONE = (1 << 28) | (1 << 12) | (2 << 24)  # FUTEX_OP(ADD, 1, CMP_LT, 0): add 1, never wake uaddr2
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class RingError(RuntimeError):
    """An inbox that cannot be used: wrong layout, or a slot outside it."""


def futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleep while the u32 at ``addr`` holds ``expected``, at most ``timeout_s``."""
    ts = Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAIT),
             ctypes.c_int(expected), ctypes.byref(ts), None, ctypes.c_int(0))


def futex_ring(addr: int) -> None:
    """Atomically add one to the u32 at ``addr`` and wake one process sleeping on it."""
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAKE_OP),
             ctypes.c_int(1), ctypes.c_void_p(0), ctypes.c_void_p(addr), ctypes.c_int(_WAKE_ADD_ONE))


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


BOARD_GROUPS = 32  # process groups a card publishes entry states for
# gid, epoch, seq, then up to 1021 values (seq is written last: it commits the entry); a phantom step's
# entry is 3 + (2 x layers + 2) costs + (2 x layers + 1) sizes (devices.phantom): 326 for an 80-layer model
BOARD_WORDS = 1024
# Data that small collectives publish beside their entry (interconnect.collectives, "on the board"): one
# area per entry. 32 KiB holds a decode step's activations up to batch 64 at hidden size 256 (bf16), and
# every message of the one-shot sizes where per-message work, not bytes, sets the wall time. The pages
# of unused areas are never touched, so they take no memory.
BOARD_DATA_BYTES = 32 << 10


class _Layout:
    """Views over an inbox segment (the same arithmetic on both sides)."""

    def __init__(self, seg: Segment):
        self.seg = seg
        self.bytes = np.frombuffer(seg.buf, np.uint8)
        self.meta = np.frombuffer(seg.buf, np.uint64, 4)  # magic, num_slots, ring_bytes, receiver pid
        self.bell_addr = self.bytes.ctypes.data + 32
        self.bell = np.frombuffer(seg.buf, np.uint32, 1, 32)  # doorbell

    def attach(self, num_slots: int, ring_bytes: int) -> None:
        self.num_slots, self.ring_bytes = num_slots, ring_bytes
        self.heads = np.frombuffer(self.seg.buf, np.uint64, num_slots, HEADER)
        self.tails = np.frombuffer(self.seg.buf, np.uint64, num_slots, HEADER + 8 * num_slots)
        self.pids = np.frombuffer(self.seg.buf, np.uint64, num_slots, HEADER + 16 * num_slots)
        self.board = np.frombuffer(self.seg.buf, np.int64, BOARD_GROUPS * 2 * BOARD_WORDS,
                                   HEADER + 24 * num_slots).reshape(BOARD_GROUPS, 2, BOARD_WORDS)
        self.board_data = np.frombuffer(self.seg.buf, np.uint8, BOARD_GROUPS * 2 * BOARD_DATA_BYTES,
                                        _board_data0(num_slots)).reshape(BOARD_GROUPS, 2, BOARD_DATA_BYTES)
        self.data0 = _data0(num_slots)

    def close(self) -> None:
        self.bytes = self.meta = self.bell = self.heads = self.tails = self.pids = self.board = None
        self.board_data = None
        self.seg.close()


def _board_data0(num_slots: int) -> int:
    return -(-(HEADER + 24 * num_slots + BOARD_GROUPS * 2 * BOARD_WORDS * 8) // 4096) * 4096


def _data0(num_slots: int) -> int:
    return _board_data0(num_slots) + BOARD_GROUPS * 2 * BOARD_DATA_BYTES


def inbox_size(num_slots: int, ring_bytes: int) -> int:
    return _data0(num_slots) + num_slots * ring_bytes


class Inbox:
    """The receiving side: one ring per sender slot, one doorbell."""

    def __init__(self, name: str, num_slots: int, ring_bytes: int = RING_BYTES):
        if num_slots < 1 or ring_bytes % ALIGN or ring_bytes < 4096:
            raise RingError(f"an inbox needs >= 1 slot and rings of >= 4096 bytes in multiples of {ALIGN}")
        self.name = name
        self._l = _Layout(Segment(name, inbox_size(num_slots, ring_bytes), create=True))
        self._l.attach(num_slots, ring_bytes)
        self._l.meta[1:4] = (num_slots, ring_bytes, os.getpid())
        self._l.meta[0] = MAGIC  # last: a sender that sees the magic sees the layout

    @property
    def num_slots(self) -> int:
        return self._l.num_slots

    def sender_pid(self, slot: int) -> int:
        return int(self._l.pids[slot])

    def ready(self, num_slots: int | None = None) -> np.ndarray:
        """Slots (of the first ``num_slots``) with unread records."""
        n = num_slots or self._l.num_slots
        return np.flatnonzero(self._l.heads[:n] != self._l.tails[:n])

    def take(self, slot: int) -> tuple[bytes, bytes] | None:
        """The next record of ``slot`` as (header, payload) copies, or None if its ring is empty."""
        lay = self._l
        tail, head = int(lay.tails[slot]), int(lay.heads[slot])
        if tail == head:
            return None
        base, rb = lay.data0 + slot * lay.ring_bytes, lay.ring_bytes
        pos = tail % rb
        hlen, plen = RECORD.unpack_from(lay.seg.buf, base + pos)
        if hlen == WRAP:
            tail += rb - pos
            pos = 0
            hlen, plen = RECORD.unpack_from(lay.seg.buf, base)
        start = base + pos + RECORD.size
        buf = lay.seg.buf
        header = buf[start:start + hlen]
        payload = buf[start + hlen:start + hlen + plen]
        lay.tails[slot] = tail + _padded(hlen + plen)
        return header, payload

    def doorbell(self) -> int:
        return int(self._l.bell[0])

    def sleep(self, seen: int, timeout_s: float = SLICE_S) -> None:
        """Sleep until a sender rings (the doorbell moves off ``seen``), at most ``timeout_s``."""
        futex_wait(self._l.bell_addr, seen, timeout_s)

    @property
    def board(self) -> np.ndarray:
        return self._l.board

    @property
    def board_data(self) -> np.ndarray:
        return self._l.board_data

    def close(self, unlink: bool = True) -> None:
        self._l.close()
        if unlink:
            self._l.seg.unlink()


class Outbox:
    """The sending side: this process's ring (``slot``) in a peer's inbox."""

    def __init__(self, name: str, slot: int):
        self.name = name
        self.slot = slot
        seg = Segment(name)
        lay = self._l = _Layout(seg)
        if int(lay.meta[0]) != MAGIC:
            lay.close()
            raise RingError(f"shared-memory segment {name} is not an inbox")
        num_slots, ring_bytes = int(lay.meta[1]), int(lay.meta[2])
        if not 0 <= slot < num_slots or seg.size < inbox_size(num_slots, ring_bytes):
            lay.close()
            raise RingError(f"inbox {name} has slots 0..{num_slots - 1}; slot {slot} is outside it")
        lay.attach(num_slots, ring_bytes)
        self.receiver_pid = int(lay.meta[3])
        self.base = lay.data0 + slot * ring_bytes
        self.head = int(lay.heads[slot])
        self.pid = os.getpid()
        lay.pids[slot] = self.pid

    @property
    def max_record(self) -> int:
        return self._l.ring_bytes // 2

    def try_send(self, header: bytes, payload=b"") -> bool:
        """Copy one record into the ring and ring the doorbell; False (nothing sent) if it is full."""
        lay, rb = self._l, self._l.ring_bytes
        hlen, plen = len(header), len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        size = _padded(hlen + plen)
        if size > self.max_record:
            raise RingError(f"a record of {hlen + plen} bytes does not fit rings of {rb} bytes")
        head = self.head
        pos = head % rb
        skip = rb - pos if pos + size > rb else 0
        if head + skip + size - int(lay.tails[self.slot]) > rb:
            return False
        buf = lay.seg.buf
        if skip:
            RECORD.pack_into(buf, self.base + pos, WRAP, 0)
            pos = 0
        at = self.base + pos
        RECORD.pack_into(buf, at, hlen, plen)
        at += RECORD.size
        buf[at:at + hlen] = header
        if plen:
            buf[at + hlen:at + hlen + plen] = payload
        self.head = head + skip + size
        lay.heads[self.slot] = self.head  # publish: the record's bytes are written before this store
        lay.pids[self.slot] = self.pid
        futex_ring(lay.bell_addr)
        return True

    @property
    def board(self) -> np.ndarray:
        return self._l.board

    @property
    def board_data(self) -> np.ndarray:
        return self._l.board_data

    def wake(self) -> None:
        """Ring the receiver's doorbell (after publishing on this process's board)."""
        futex_ring(self._l.bell_addr)

    def receiver_alive(self) -> bool:
        return pid_alive(self.receiver_pid)

    def close(self) -> None:
        self._l.close()


def _padded(n: int) -> int:
    return -(-(RECORD.size + n) // ALIGN) * ALIGN


def spin_until(ready, spin_s: float = SPIN_S) -> bool:
    """Poll ``ready()`` for ``spin_s``; True as soon as it holds.

    No ``sched_yield`` between polls: on a loaded host a yield hands the core to any other
    runnable process for a whole time slice (milliseconds, measured on 2 cores), while a
    sleeper woken by the doorbell is scheduled at once."""
    until = time.perf_counter() + spin_s
    while True:
        if ready():
            return True
        if time.perf_counter() > until:
            return False
