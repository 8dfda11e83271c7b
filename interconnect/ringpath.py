"""The fabric's same-host path: every message through shared-memory rings (``interconnect.shmring``).

A card owns one inbox; it attaches an outbox (its slot in the peer's inbox) the
first time it sends to a peer. Headers and small payloads travel in the ring;
large payloads stay in the sender's fabric window, as on the socket path, and
only their header goes through the ring. The path is used when every peer of
the card is on this host (``ipc://`` endpoints) and has a slot; otherwise the
fabric keeps ZeroMQ for every message, so a card waits on one thing only.

Waiting for a message spins briefly, then sleeps on the inbox's doorbell in
100 ms slices; between slices it asks the host whether to abort and checks that
the card it waits on still runs, so a card that died mid-message is noticed
within a slice, not at the receive timeout.
"""
from __future__ import annotations

import os
import time

from interconnect.board import Board
from interconnect.segment import SHM_DIR, SegmentError
from interconnect.shmring import FIRST_SLICE_S, SLICE_S, SPIN_S, Inbox, Outbox, RingError, pid_alive, spin_until

SOCKET_CHECK_S = 0.01  # how often a waiting card also looks at its ZeroMQ socket
MAX_SLOTS = 256  # cards one inbox serves; the rings are sparse, only written pages cost memory


class RingPath:
    def __init__(self, fabric, inbox_name):
        self.fabric = fabric
        self.inbox_name = inbox_name
        name = inbox_name(fabric.rank)
        (SHM_DIR / name).unlink(missing_ok=True)  # transient: a restarted card makes a new one
        self.inbox = Inbox(name, MAX_SLOTS)
        self.outboxes: dict[int, Outbox] = {}
        self.active = False
        self.num_slots = MAX_SLOTS
        self._socket_check = 0.0
        self.board = Board(self)  # entry states of phantom collectives (interconnect.board)

    def configure(self, peers: dict[int, str]) -> None:
        """Use the rings if every peer is on this host and has a slot; forget attachments either way
        (a restarted peer has a new inbox)."""
        self._drop_outboxes()
        self.board.reset()
        self.inbox._l.pids[:] = 0  # senders of an earlier configuration say who they are again
        self.active = (self.fabric.rank < MAX_SLOTS and
                       all(ep.startswith("ipc://") and c < MAX_SLOTS for c, ep in peers.items()))
        self.num_slots = max([self.fabric.rank, *peers]) + 1

    def _outbox(self, dst: int) -> Outbox:
        box = self.outboxes.get(dst)
        if box is None:
            from interconnect.fabric import FabricError

            if dst not in self.fabric.peers:
                raise FabricError(f"card {self.fabric.rank}: no route to card {dst}")
            try:
                box = Outbox(self.inbox_name(dst), self.fabric.rank)
            except (SegmentError, RingError) as exc:
                raise FabricError(f"card {self.fabric.rank}: cannot reach card {dst}'s inbox: {exc}") from None
            self.outboxes[dst] = box
        return box

    def send(self, dst: int, header: bytes, payload=None) -> None:
        box = self._outbox(dst)
        if box.try_send(header, b"" if payload is None else payload):
            return
        self._wait_room(dst, box, header, payload)

    def _wait_room(self, dst: int, box: Outbox, header: bytes, payload) -> None:
        """The peer's ring is full: take in what arrives meanwhile (the peer may be sending to us,
        full too) until there is room, the peer is gone, or the host aborts."""
        from interconnect.fabric import FabricError, FabricTimeout

        fabric = self.fabric
        deadline = time.monotonic() + fabric.recv_timeout
        check = time.monotonic() + SLICE_S
        while not box.try_send(header, b"" if payload is None else payload):
            self.drain()
            os.sched_yield()
            now = time.monotonic()
            if now >= check:
                check = now + SLICE_S
                fabric.abort_check()
                if not box.receiver_alive():
                    raise FabricError(f"card {fabric.rank}: card {dst} (pid {box.receiver_pid}) died while "
                                      f"this card waited for room in its inbox")
                if now > deadline:
                    raise FabricTimeout(f"card {fabric.rank}: card {dst}'s inbox stayed full for "
                                        f"{fabric.recv_timeout:.0f} s")

    def drain(self) -> int:
        """File every record waiting in the inbox; how many."""
        n = 0
        inbox = self.inbox
        for slot in inbox.ready(self.num_slots):
            while (rec := inbox.take(int(slot))) is not None:
                header, payload = rec
                self.fabric._file_checked((header, payload) if payload else (header,))
                n += 1
        return n

    def serve_socket(self) -> None:
        """Now and then, file what came on the ZeroMQ socket: strays are heard and judged there too."""
        if time.monotonic() >= self._socket_check:
            self._socket_check = time.monotonic() + SOCKET_CHECK_S
            fabric = self.fabric
            while fabric._pull.poll(0):
                fabric._file_checked(fabric._pull.recv_multipart(copy=False))

    def pump(self, waiting_for: str, src: int | None) -> None:
        """Wait until at least one record arrived and file what is there."""
        from interconnect.fabric import FabricError, FabricTimeout

        fabric, inbox = self.fabric, self.inbox
        self.serve_socket()
        if self.drain() or (spin_until(lambda: inbox.ready(self.num_slots).size, SPIN_S) and self.drain()):
            return
        deadline = time.monotonic() + fabric.recv_timeout
        slice_s = FIRST_SLICE_S
        while True:
            seen = inbox.doorbell()
            if self.drain():
                return
            inbox.sleep(seen, slice_s)
            if self.drain():
                return
            if slice_s < SLICE_S:
                slice_s = SLICE_S
                continue
            fabric.abort_check()
            if src is not None and src != fabric.rank:
                pid = inbox.sender_pid(src) if src < inbox.num_slots else 0
                if pid and not pid_alive(pid):
                    raise FabricError(f"card {fabric.rank}: card {src} (pid {pid}) died while this card "
                                      f"waited for {waiting_for}")
            if time.monotonic() > deadline:
                raise FabricTimeout(f"card {fabric.rank}: waited {fabric.recv_timeout:.0f} s for {waiting_for}")

    def _drop_outboxes(self) -> None:
        for box in self.outboxes.values():
            box.close()
        self.outboxes.clear()

    def close(self) -> None:
        self._drop_outboxes()
        self.inbox.close(unlink=True)
