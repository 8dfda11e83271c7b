"""A card's fabric window: the shared memory its peers read large payloads from.

Cards on one host move large payloads through shared memory rather than
through the socket: the socket carries only the header, naming an offset in
the sender's window, and the receiver reads (or reduces) straight from there,
then acknowledges so the sender may reuse that memory. This is the shape of
PCIe peer-to-peer DMA through a BAR window, and it spares the two copies and
the scheduling ping-pong of a Unix socket (see ``bench/collectives.py``).

Buffers allocated with ``Window.empty`` live in the window ("registered", as
NCCL user buffers are): sending from them copies nothing. Any other buffer is
first staged into a window region, freed when the receiver acknowledges.
"""
from __future__ import annotations

import numpy as np

from interconnect.segment import Segment

ALIGN = 4096


class WindowFull(MemoryError):
    pass


class Window:
    def __init__(self, name: str, size: int):
        self.segment = Segment(name, size, create=True)
        self.size = self.segment.size
        self.bytes = np.frombuffer(self.segment.buf, np.uint8)
        self.base = self.bytes.ctypes.data
        self._used: dict[int, int] = {}  # offset -> size

    def alloc(self, nbytes: int) -> int:
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        cursor = 0
        for off in sorted(self._used):
            if off - cursor >= size:
                break
            cursor = off + self._used[off]
        if cursor + size > self.size:
            raise WindowFull(f"fabric window full: {nbytes} bytes wanted, {self.size} total")
        self._used[cursor] = size
        return cursor

    def free(self, offset: int) -> None:
        self._used.pop(offset, None)

    def offset_of(self, arr: np.ndarray) -> int | None:
        """Offset of ``arr``'s bytes in this window, or None if they live elsewhere."""
        addr = arr.__array_interface__["data"][0]
        if self.base <= addr and addr + arr.nbytes <= self.base + self.size:
            return addr - self.base
        return None

    def empty(self, count: int, dtype) -> np.ndarray:
        """A registered array: sends from it are zero-copy. Free it with ``release``."""
        dtype = np.dtype(dtype)
        off = self.alloc(count * dtype.itemsize)
        return np.frombuffer(self.segment.buf, dtype, count, off)

    def release(self, arr: np.ndarray) -> None:
        off = self.offset_of(arr)
        if off is not None:
            self.free(off)

    def close(self, unlink: bool = True) -> None:
        self.bytes = None
        self.segment.close()
        if unlink:
            self.segment.unlink()


class PeerWindows:
    """Read-only views into other cards' windows, mapped on first use."""

    def __init__(self, name_of):
        self.name_of = name_of
        self._maps: dict[int, Segment] = {}

    def view(self, card: int, offset: int, nbytes: int) -> np.ndarray:
        seg = self._maps.get(card)
        if seg is None or seg.size < offset + nbytes:
            seg = self._maps[card] = Segment(self.name_of(card))
        if offset < 0 or nbytes < 0 or offset + nbytes > seg.size:
            raise ValueError(f"region [{offset}, {offset + nbytes}) is outside card {card}'s window "
                             f"of {seg.size} bytes")
        return np.frombuffer(seg.buf, np.uint8, nbytes, offset)

    def forget(self) -> None:
        """Drop every mapping (a peer restarted: its window is a new file)."""
        self._maps.clear()
