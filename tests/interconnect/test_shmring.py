"""Shared-memory rings between real processes: whole records, in order, dead peers noticed, nothing left."""
from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import stat
import tempfile
import time

import numpy as np
import pytest
import zmq

from devices.shm import segment_name
from interconnect.emulation import PortClock
from interconnect.fabric import Clock, Fabric, FabricError
from interconnect.group import ProcessGroup
from interconnect.segment import SHM_DIR
from interconnect.shmring import SUPPORTED, Inbox, Outbox, RingError
from interconnect.topology import get_topology
from rsd_runtime import Cluster

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="shared-memory rings run on x86-64 only")
SPAWN = mp.get_context("spawn")
NUM_RECORDS = 1500


def _record(slot: int, i: int) -> tuple[bytes, bytes]:
    """Record i of a sender: sizes from 0 to ~3 KB, so 8 KiB rings wrap and fill often."""
    size = (i * 37 + slot * 11) % 3001
    return f"{slot}:{i}".encode(), bytes((i + k) % 251 for k in range(size % 64)) * (size // 64 + 1)


def _send_records(name: str, slot: int) -> None:
    box = Outbox(name, slot)
    for i in range(NUM_RECORDS):
        header, payload = _record(slot, i)
        while not box.try_send(header, payload):
            time.sleep(0)
    box.close()


def _run_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


def test_records_arrive_whole_and_in_order_from_several_senders(shm_prefix):
    name = segment_name(_run_name(shm_prefix), 0, "inbox")
    inbox = Inbox(name, num_slots=3, ring_bytes=8192)
    try:
        assert stat.S_IMODE(os.stat(SHM_DIR / name).st_mode) == 0o600
        senders = [SPAWN.Process(target=_send_records, args=(name, slot)) for slot in (1, 2)]
        for p in senders:
            p.start()
        got = {1: 0, 2: 0}
        deadline = time.monotonic() + 60
        while sum(got.values()) < 2 * NUM_RECORDS and time.monotonic() < deadline:
            seen = inbox.doorbell()
            ready = inbox.ready()
            if not ready.size:
                inbox.sleep(seen, 0.05)
            for slot in ready:
                while (rec := inbox.take(int(slot))) is not None:
                    assert rec == _record(int(slot), got[int(slot)])  # whole, and the next one in order
                    got[int(slot)] += 1
        assert got == {1: NUM_RECORDS, 2: NUM_RECORDS}
        assert inbox.take(1) is None and inbox.take(2) is None
        for p in senders:
            p.join(10)
            assert p.exitcode == 0
    finally:
        inbox.close()
    assert not (SHM_DIR / name).exists()


def test_bad_slots_and_oversized_records_are_refused(shm_prefix):
    name = segment_name(_run_name(shm_prefix), 0, "inbox")
    inbox = Inbox(name, num_slots=2, ring_bytes=4096)
    try:
        with pytest.raises(RingError, match="slot 2 is outside"):
            Outbox(name, 2)
        box = Outbox(name, 1)
        with pytest.raises(RingError, match="does not fit"):
            box.try_send(b"h", bytes(4000))
        box.close()
    finally:
        inbox.close()
    with pytest.raises(Exception, match="does not exist"):
        Outbox(name, 1)


def _fabric(ctx, run: str, rank: int, run_dir: str, n: int = 2) -> Fabric:
    fabric = Fabric(ctx, rank, "s3cret", Clock(), bind=f"ipc://{run_dir}/f{rank}",
                    inbox_name=lambda c: segment_name(run, c, "inbox"), recv_timeout=30)
    topo = get_topology("switch", n)
    fabric.configure({c: f"ipc://{run_dir}/f{c}" for c in range(n)}, PortClock(topo, rank, lambda n: 0))
    return fabric


def _tear_down(run: str, fabric: Fabric, ctx, peers: list, n: int) -> None:
    """Kill the peer processes, close card 0's fabric and remove every card's inbox."""
    for p in peers:
        p.kill()
        p.join(10)
    fabric.close()
    ctx.destroy(linger=0)
    for c in range(n):
        (SHM_DIR / segment_name(run, c, "inbox")).unlink(missing_ok=True)


def _data(rank: int, seq: int) -> np.ndarray:
    """What member ``rank`` publishes with call ``seq``: its length and bytes change every call."""
    return (np.arange((seq * 7 + rank * 3) % 1000 + 1, dtype=np.int64) * 31 + seq * 1000 + rank).astype(np.int32)


def _exchanges(group: ProcessGroup, calls: int, mode: str = "values") -> None:
    """``calls`` exchanges, each checked: a few ints (phantom collectives), a phantom step's hundreds,
    or a few ints and a buffer (small collectives of real cards), read in place from every member."""
    board = group.fabric.rings.board
    for _ in range(calls):
        seq = group.begin()
        want = [[r, seq, 10**12 + r * seq] + ([r * seq] * 131 if mode == "step" else []) for r in range(group.size)]
        if mode != "data":
            assert group.exchange(seq, want[group.rank]) == want
            continue
        mine = _data(group.rank, seq)
        assert board.exchange(group.ranks, group.gid, group.fabric.epoch, seq, want[group.rank], mine) == want
        for r in range(group.size):
            expected = _data(r, seq)
            assert np.array_equal(board.data(r, group.gid, expected.nbytes).view(np.int32), expected)


def _board_peer(run: str, run_dir: str, rank: int, n: int, ready, calls: int, mode: str) -> None:
    ctx = zmq.Context()
    fabric = _fabric(ctx, run, rank, run_dir, n)
    ready.wait(10)  # every member has its inbox
    _exchanges(ProcessGroup(fabric, list(range(n))), calls, mode)
    time.sleep(60)  # stays in the group until killed


@pytest.mark.parametrize("mode", ["values", "step", "data"])
def test_entry_states_are_exchanged_in_place_and_a_killed_member_is_noticed(shm_prefix, mode):
    run, n, calls = _run_name(shm_prefix), 3, 300
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="rsd-ring-") as run_dir:
        fabric = _fabric(ctx, run, 0, run_dir, n)
        ready = SPAWN.Barrier(n)
        peers = [SPAWN.Process(target=_board_peer, args=(run, run_dir, r, n, ready, calls, mode)) for r in (1, 2)]
        for p in peers:
            p.start()
        try:
            group = ProcessGroup(fabric, list(range(n)))
            ready.wait(30)
            _exchanges(group, calls, mode)  # every call's values, from every member, in group order
            os.kill(peers[1].pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(FabricError, match=rf"card 2 \(pid {peers[1].pid}\) died while this card waited"):
                group.exchange(group.begin(), [0, 0, 0])
            assert time.monotonic() - t0 < 2.0
        finally:
            _tear_down(run, fabric, ctx, peers, n)
    assert not list(SHM_DIR.glob(f"{run}_*"))


def _board_then_skip(group: ProcessGroup, rounds: int) -> None:
    """Board calls with a call number between each two that synchronises nothing (as a broadcast's
    root only sends): every board call's values and data, checked."""
    board = group.fabric.rings.board
    for _ in range(rounds):
        seq = group.begin()
        want = [[r, seq, 7 * seq + r] for r in range(group.size)]
        assert board.exchange(group.ranks, group.gid, group.fabric.epoch, seq, want[group.rank],
                              _data(group.rank, seq)) == want
        for r in range(group.size):
            expected = _data(r, seq)
            assert np.array_equal(board.data(r, group.gid, expected.nbytes).view(np.int32), expected)
        group.begin()  # the call in between


def _slow_reader(run: str, run_dir: str, ready, done) -> None:
    """Card 1: publishes each board call, then looks at card 0's entry only 0.3 s later, as a card
    the scheduler took off its core would."""
    from interconnect.board import Board

    read = Board._read

    def late(self, *args):
        time.sleep(0.3)
        return read(self, *args)

    Board._read = late
    ctx = zmq.Context()
    fabric = _fabric(ctx, run, 1, run_dir)
    ready.wait(10)
    try:
        _board_then_skip(ProcessGroup(fabric, [0, 1]), 4)
        done.set()
    finally:
        time.sleep(1)  # card 0 reads its last entry
        fabric.close()
        ctx.destroy(linger=0)


def test_a_card_ahead_by_a_call_that_does_not_wait_overwrites_nothing_a_slow_peer_reads(shm_prefix):
    """Card 0 finishes board call k, takes call k + 1 without waiting and publishes board call k + 2
    while card 1 has not read card 0's entry of call k yet: the two board calls use different halves."""
    run = _run_name(shm_prefix)
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="rsd-ring-") as run_dir:
        fabric = _fabric(ctx, run, 0, run_dir)
        fabric.recv_timeout = 10
        ready, done = SPAWN.Barrier(2), SPAWN.Event()  # both inboxes exist
        peer = SPAWN.Process(target=_slow_reader, args=(run, run_dir, ready, done))
        peer.start()
        try:
            ready.wait(30)
            _board_then_skip(ProcessGroup(fabric, [0, 1]), 4)
            assert done.wait(10)
            peer.join(10)
            assert peer.exitcode == 0
        finally:
            _tear_down(run, fabric, ctx, [peer], 2)
    assert not list(SHM_DIR.glob(f"{run}_*"))


def _peer(run: str, run_dir: str, ready) -> None:
    """Card 1: send one message to card 0, then hang until killed."""
    ctx = zmq.Context()
    fabric = _fabric(ctx, run, 1, run_dir)
    ready.wait(10)
    fabric.send(0, (0, 7), np.arange(4, dtype=np.int32))
    time.sleep(60)


def test_a_card_waiting_on_a_killed_peer_gets_a_clear_error_within_two_seconds(shm_prefix):
    run = _run_name(shm_prefix)
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="rsd-ring-") as run_dir:
        fabric = _fabric(ctx, run, 0, run_dir)
        ready = SPAWN.Event()
        peer = SPAWN.Process(target=_peer, args=(run, run_dir, ready))
        peer.start()
        try:
            ready.set()
            msg = fabric.recv(1, (0, 7))
            assert fabric.rings.active and msg.array("int32").tolist() == [0, 1, 2, 3]
            fabric.done(msg)
            os.kill(peer.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(FabricError, match=rf"card 1 \(pid {peer.pid}\) died while this card waited"):
                fabric.recv(1, (0, 8))
            assert time.monotonic() - t0 < 2.0
        finally:
            _tear_down(run, fabric, ctx, [peer], 2)
    assert not list(SHM_DIR.glob(f"{run}_*"))


@pytest.mark.parametrize("phantom", [False, True])
def test_cards_talk_through_rings_and_leave_nothing(shm_prefix, phantom):
    with Cluster(num_devices=3, shm_prefix=shm_prefix, phantom=phantom) as c:
        inboxes = sorted(p.name for p in SHM_DIR.glob(f"{c.run_name}_*_inbox"))
        assert len(inboxes) == 3
        assert all(stat.S_IMODE(os.stat(SHM_DIR / n).st_mode) == 0o600 for n in inboxes)
        inputs = [np.arange(10, dtype=np.float32) * (r + 1) for r in range(3)]
        for algo in ("one-shot", "ring", "tree"):
            res = c.collective("all_reduce", inputs, algo=algo)
            if not phantom:
                assert all(np.array_equal(o, np.arange(10, dtype=np.float32) * 6) for o in res["outputs"])
        big = [np.full(1 << 18, r, np.float32) for r in range(3)]  # past the copy threshold: the window
        res = c.collective("all_gather", big, algo="ring")
        if not phantom:
            assert all(np.array_equal(o, np.concatenate(big)) for o in res["outputs"])
    assert not list(SHM_DIR.glob(f"{c.run_name}_*"))
