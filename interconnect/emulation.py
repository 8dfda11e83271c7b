"""The emulated clock of one card's fabric ports.

Every message carries the time its first byte left the sender (``start``), how
long it holds a port (``occ``: serialisation at its share of the bottleneck
bandwidth) and the path latency (``lat``), all integer nanoseconds.

* Sender: a port sends one message at a time, so ``start = max(now,
  tx_free)`` and ``tx_free = start + occ``. Sending does not advance the
  sender's own clock: the card's DMA engine moves the bytes.
* Receiver: ``arrival = max(start + lat + occ, rx_free + occ)`` and
  ``rx_free = arrival``: a port receives one message at a time. Receives are
  applied in the order the program asks for them, never in the order the host
  happened to deliver them, so emulated figures do not depend on host load.
* The waiting card's clock becomes ``max(clock, arrival)``.
* Every link a message crosses (switch uplinks, cables, root complexes, NICs)
  is shared by max-min fairness among the flows running at the same emulated
  time: the collective step's own flows (every channel of a multi-ring call,
  both trees of a double binary tree) and the same step of every other
  instance on the fabric (``Topology``, ``topo_tenants``).
* A reduction of a received message runs on the card at memory bandwidth and
  is pipelined with the transfer in ``REDUCE_SLICE`` pieces, as reduce-copy
  kernels and DMA engines with in-line reduction do: it starts with the first
  byte and cannot end before the last byte plus the reduction of one slice::

      done = max(arrival, max(arrival - occ, clock) + reduce(n)) + reduce(slice)
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

from interconnect.links import LinkDegradation
from interconnect.topology import Topology

REDUCE_SLICE = 512 << 10  # bytes; NCCL's default chunk for ring steps is of this order (NCCL_BUFFSIZE / steps)


@lru_cache(maxsize=1 << 16)
def _cost(topology: Topology, src: int, dst: int, nbytes: int, flows: tuple) -> tuple[int, int]:
    """(occupancy, latency) of a message, shared by every port clock on the same topology object."""
    lat = topology.latency_ns(src, dst)
    total = topology.transfer_time_ns(src, dst, nbytes, flows or None)
    return total - lat, lat


class PortClock:
    def __init__(self, topology: Topology, rank: int, reduce_ns: Callable[[int], int],
                 degraded: dict[int, LinkDegradation] | None = None):
        self.topology = topology
        self.degraded = degraded if degraded is not None else {}  # destination card -> its path's fault
        self.rank = rank
        self.reduce_ns = reduce_ns
        self.tx_free = 0
        self.rx_free = 0

    @property
    def state(self) -> tuple[int, int]:
        return self.tx_free, self.rx_free

    def depart(self, now: int, dst: int, nbytes: int, flows: tuple = ()) -> dict:
        """Stamp for a message leaving now; updates the send port."""
        occ, lat = _cost(self.topology, self.rank, dst, nbytes, flows)
        start = max(now, self.tx_free)
        fault = self.degraded.get(dst)
        if fault is not None:
            occ, lat = fault.apply(start, occ, lat)
        self.tx_free = start + occ
        return {"start": start, "occ": occ, "lat": lat}

    def arrive(self, stamp: dict) -> int:
        """Emulated arrival time of a message with this stamp; updates the receive port."""
        arrival = max(stamp["start"] + stamp["lat"] + stamp["occ"], self.rx_free + stamp["occ"])
        self.rx_free = arrival
        return arrival

    def receive(self, now: int, stamp: dict, nbytes: int, reduce: bool) -> tuple[int, int]:
        """(the receiving card's clock once the message is in, or reduced in; its arrival time)."""
        arrival = self.arrive(stamp)
        if reduce:
            return self.reduce_done(now, arrival, stamp["occ"], nbytes), arrival
        return max(now, arrival), arrival

    def reduce_done(self, clock: int, arrival: int, occ: int, nbytes: int) -> int:
        """Clock after reducing a message of nbytes into a local buffer as it streams in."""
        streamed = max(arrival - occ, clock) + self.reduce_ns(nbytes)
        return max(arrival, streamed) + self.reduce_ns(min(nbytes, REDUCE_SLICE))


def memory_reduce_ns(memory_bw: float, efficiency: float) -> Callable[[int], int]:
    """A reduction reads two operands and writes one: 3 bytes of memory traffic per byte."""
    rate = memory_bw * efficiency  # bytes/s

    def reduce_ns(nbytes: int) -> int:
        return -(-3 * nbytes * 10**9 // int(rate)) if nbytes else 0

    return reduce_ns
