"""Entry states of collectives through shared memory: each card publishes, its peers read in place.

A phantom collective needs only every member's entry state (clock, send port,
receive port) to simulate itself (``interconnect.sim``). Instead of n - 1
messages out and n - 1 in per card, a card writes its state once on the board
of its own inbox segment (``interconnect.shmring``), rings the doorbells of the
peers that sleep, and reads the peers' states straight from their boards.
Small collectives of real cards go the same way with their data: each card
publishes its buffer beside its entry state, reads its peers' buffers in place
and reduces them itself (``interconnect.collectives``, "on the board").

An entry is ``[gid, epoch, seq, v0, v1, ...]`` in the group's row of the card's
board; ``seq`` is written last and commits it. The group's board calls alternate
between the row's two halves. A card can be at most one board call ahead of any
member of its group (it cannot finish board call b + 1 before every member has
published b + 1, which each does only after reading board call b, data
included), so two halves are enough: nothing is overwritten while a peer may
still read it. The half follows the count of board calls, not the call number
``seq``: a call between two board calls that does not make the card wait (the
root of a broadcast only sends) lets it start the next board call while a peer
still reads the last one, and with ``seq % 2`` both would share a half.
"""
from __future__ import annotations

import time

import numpy as np

from interconnect.shmring import BOARD_GROUPS, BOARD_WORDS, FIRST_SLICE_S, SLICE_S, pid_alive

MAX_VALUES = BOARD_WORDS - 3


class Board:
    def __init__(self, path):
        self.path = path  # the card's RingPath
        self.rows: dict[int, int] = {}  # gid -> row on this card's board
        self.peer_rows: dict[tuple, int] = {}  # (card, gid) -> row on that card's board
        self._peers: dict[int, tuple] = {}  # gid -> (its cards, [(peer, its outbox)])
        self._halves: dict[tuple, tuple] = {}  # (card, gid) -> both halves of that card's row, as views
        self.calls: dict[int, int] = {}  # gid -> board calls of the group so far (their parity picks the half)

    def reset(self) -> None:
        """Forget every entry (the group call numbers restart, or a peer has a new inbox)."""
        self.path.inbox.board[:, :, :3] = 0  # gid, epoch, seq: no entry matches
        self.rows.clear()
        self.peer_rows.clear()
        self._peers.clear()
        self._halves.clear()
        self.calls.clear()

    def can_publish(self, gid: int, num_values: int) -> bool:
        return num_values <= MAX_VALUES and (gid in self.rows or len(self.rows) < BOARD_GROUPS)

    def exchange(self, cards: list[int], gid: int, epoch: int, seq: int, values: list[int],
                 data: np.ndarray | None = None) -> list[list[int]]:
        """Every card's ``values`` for call ``seq`` of group ``gid``, in the order of ``cards``.
        ``data`` (contiguous, at most ``BOARD_DATA_BYTES``) is published beside them: ``data`` reads it."""
        path = self.path
        path.serve_socket()
        row = self.rows.setdefault(gid, len(self.rows))
        half = self.calls.get(gid, 0) % 2
        self.calls[gid] = self.calls.get(gid, 0) + 1
        entry = path.inbox.board[row, half]
        if data is not None:
            raw = data.reshape(-1).view(np.uint8)
            path.inbox.board_data[row, half, :raw.size] = raw
        n = len(values)
        entry[3:3 + n] = values
        entry[:2] = gid, epoch
        entry[2] = seq  # last: commits the entry
        known = self._peers.get(gid)
        if known is None or known[0] != cards:
            me = path.fabric.rank
            known = self._peers[gid] = (list(cards), [(c, path._outbox(c)) for c in cards if c != me])
        peers = known[1]
        for _, box in peers:
            box.wake()
        got = {path.fabric.rank: list(values)}
        key = (gid, epoch, seq, n, half)
        pending = [p for p in peers if not self._read(p[0], p[1], key, got)]
        if pending:
            self._wait(pending, key, got)
        return [got[c] for c in cards]

    def data(self, card: int, gid: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of what ``card`` published with the last exchange of group ``gid`` (after
        it returned): read in place, valid until this card's next board call of the group."""
        path, half = self.path, (self.calls[gid] - 1) % 2
        if card == path.fabric.rank:
            return path.inbox.board_data[self.rows[gid], half, :nbytes]
        return path._outbox(card).board_data[self.peer_rows[(card, gid)], half, :nbytes]

    def _wait(self, pending: list[tuple], key: tuple, got: dict) -> None:
        """Until every (card, outbox) of ``pending`` has published call ``key``."""
        from interconnect.fabric import FabricError, FabricTimeout

        path, me, seq = self.path, self.path.fabric.rank, key[2]
        inbox, fabric = path.inbox, path.fabric
        deadline = time.monotonic() + fabric.recv_timeout
        slice_s = FIRST_SLICE_S
        while pending:
            seen = inbox.doorbell()
            pending = [p for p in pending if not self._read(p[0], p[1], key, got)]
            if pending:
                inbox.sleep(seen, slice_s)
            pending = [p for p in pending if not self._read(p[0], p[1], key, got)]
            if not pending:
                break
            if slice_s < SLICE_S:
                slice_s = SLICE_S
                continue
            fabric.abort_check()
            for c, box in pending:
                if not pid_alive(box.receiver_pid):
                    raise FabricError(f"card {me}: card {c} (pid {box.receiver_pid}) died while this card "
                                      f"waited for its entry state (group call {seq})")
            if time.monotonic() > deadline:
                raise FabricTimeout(f"card {me}: waited {fabric.recv_timeout:.0f} s for the entry states of "
                                    f"cards {[c for c, _ in pending]} (group call {seq})")

    def _read(self, card: int, box, key: tuple, got: dict) -> bool:
        gid, epoch, seq, n, half = key
        halves = self._halves.get((card, gid))
        if halves is None:
            board = box.board
            rows = np.flatnonzero(board[:, 0, 0] == gid)
            if not rows.size:
                rows = np.flatnonzero(board[:, 1, 0] == gid)
                if not rows.size:
                    return False
            row = self.peer_rows[(card, gid)] = int(rows[0])
            halves = self._halves[(card, gid)] = (board[row, 0], board[row, 1])
        # one copy, in index order: seq (word 2) is loaded before the values it commits (x86 keeps
        # loads in order), and a half is not rewritten while a member may still read it
        entry = halves[half][:3 + n].tolist()
        if entry[2] != seq or entry[1] != epoch or entry[0] != gid:
            return False
        got[card] = entry[3:]
        return True
