"""Card commands for the fabric: configure it, run collectives, measure them.

The host sends the same command to every card of a group; each card runs its
part against its peers directly (the host relays nothing) and replies with its
result and its clocks.
"""
from __future__ import annotations

import time

import numpy as np

from devices import fields

from interconnect import collectives as coll
from interconnect.collectives import out_count, run_collective as run
from interconnect import wire
from interconnect.emulation import PortClock, memory_reduce_ns
from interconnect.group import ProcessGroup, split
from interconnect.reduce import ReduceOp
from interconnect.topology import topology_for



class CollectiveOps:
    def __init__(self, card):
        self.card = card
        self.groups: dict[tuple, ProcessGroup] = {}
        self.topology = None

    def handlers(self) -> dict:
        return {"fabric_init": self.op_fabric_init, "collective": self.op_collective,
                "collective_bench": self.op_collective_bench, "clock_reset": self.op_clock_reset,
                "collective_reuse": self.op_collective_reuse, "resync": self.op_resync}

    def group(self, ranks) -> ProcessGroup:
        key = tuple(int(r) for r in ranks)
        if key not in self.groups:
            self.groups[key] = ProcessGroup(self.card.fabric, list(key))
        return self.groups[key]

    def reset(self, epoch: int | None = None) -> None:
        """Restart every group's call numbers and drop stray messages (after an abort or a
        re-configuration). Group objects are kept: a loaded command stream holds its group."""
        for g in self.groups.values():
            g.seq = 0
        self.card.fabric.reset(epoch)

    def op_resync(self, h, frames):
        """Enter the host's new epoch: every card of the run starts its groups afresh, together."""
        self.reset(fields.integer(h, "epoch", 0))
        return {"epoch": self.card.fabric.epoch}, []

    def op_fabric_init(self, h, frames):
        self.reset()
        spec = self.card.spec
        self.topology = topology_for(h["topology"], int(h["num_cards"]), h["link"], tenants=h.get("tenants", ()),
                                     **h.get("options", {}))
        ports = PortClock(self.topology, self.card.card, memory_reduce_ns(spec.memory_bw, spec.memory_efficiency),
                          self.card.link_faults)
        self.card.fabric.configure(h["peers"], ports)
        return {"topology": repr(self.topology)}, []

    def op_clock_reset(self, h, frames):
        self._reset_clock()
        return {}, []

    def _reset_clock(self) -> None:
        self.card.clock.now = 0
        self.card.fabric.ports.tx_free = self.card.fabric.ports.rx_free = 0

    def op_collective(self, h, frames):
        """Run one collective on the payload the host sent; reply with the result."""
        g = self.group(h["group"])
        dtype = wire.check_dtype(h["dtype"])
        kind = h["kind"]
        np_dtype = wire.DTYPES[dtype][0]
        data = np.frombuffer(frames[0].buffer, np_dtype).copy() if frames else np.zeros(0, np_dtype)
        start_emu, t0 = self.card.clock.now, time.perf_counter_ns()
        out = run(kind, g, data, dtype, h.get("algo", "auto"), h.get("redop", "sum"), int(h.get("root", 0)),
                  int(h.get("peer", 0)), fields.integer(h, "tag", 0, 1 << 30, 0))
        return {"emu_ns": self.card.clock.now - start_emu, "wall_ns": time.perf_counter_ns() - t0,
                "clock_ns": self.card.clock.now}, [out]

    def op_collective_bench(self, h, frames):
        """nccl-tests style: generated inputs, warm-up, one emulated run from clock 0, timed runs, #wrong."""
        g = self.group(h["group"])
        dtype, kind, count = wire.check_dtype(h.get("dtype")), h["kind"], fields.integer(h, "count", 0, 1 << 32)
        algo, redop, root = h.get("algo", "auto"), h.get("redop", "sum"), int(h.get("root", 0))
        if g.phantom:  # no byte is read or written: pages never touched cost no memory (16 cards x 1 GiB)
            data = np.empty(count // g.size if kind == "all_gather" else count, wire.DTYPES[dtype][0])
            fresh = lambda: data  # noqa: E731
        else:
            data = bench_input(kind, g.rank, g.size, count, dtype)
            fresh = data.copy
        for _ in range(fields.integer(h, "warmup", 0, 1 << 20, 2)):
            run(kind, g, fresh(), dtype, algo, redop, root)
        coll.barrier(g)
        self._reset_clock()
        out = run(kind, g, fresh(), dtype, algo, redop, root)
        emu_ns = self.card.clock.now
        wrong = None if g.phantom else count_wrong(kind, out, g.rank, g.size, count, dtype, redop, root)
        iters = fields.integer(h, "iters", 1, 1 << 20, 5)
        # registered buffers, as NCCL benchmarks use device memory the fabric can reach directly
        bufs = [g.copy(data) for _ in range(min(iters, 2))]
        out = g.empty(out_count(kind, data.size, g.size), data.dtype)
        try:
            coll.barrier(g)
            t0 = time.perf_counter_ns()
            for i in range(iters):
                run(kind, g, bufs[i % len(bufs)], dtype, algo, redop, root, out=out)
            wall_ns = (time.perf_counter_ns() - t0) / max(iters, 1)
        finally:
            for b in (*bufs, out):
                g.release(b)
        return {"emu_ns": emu_ns, "wall_ns": wall_ns, "wrong": wrong}, []


    def op_collective_reuse(self, h, frames):
        """Back-to-back all_reduces, each buffer overwritten the moment the previous call returns.

        Catches a send whose buffer is reused before the transport let go of it.
        """
        g = self.group(h["group"])
        dtype, count, algo, iters = wire.check_dtype(h["dtype"]), int(h["count"]), h["algo"], int(h["iters"])
        np_dtype = wire.DTYPES[dtype][0]
        buf = g.empty(count, np_dtype) if h.get("registered") else np.empty(count, np_dtype)
        wrong = 0
        try:
            for i in range(iters):
                buf[...] = _store(_values(g.rank + i, count), dtype)
                coll.all_reduce(buf, "sum", g, dtype=dtype, algo=algo)
                want = _store(sum(_values(r + i, count) for r in range(g.size)), dtype)
                wrong += int(np.count_nonzero(buf != want))
        finally:
            g.release(buf)
        return {"wrong": wrong}, []


# -- nccl-tests style data: small integers, exact in every dtype, cheap to check --------
def _values(rank: int, count: int) -> np.ndarray:
    return (rank % 4 + np.arange(count) % 3).astype(np.float32)  # sums stay < 256: exact in bfloat16


def _store(v: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return v.astype(wire.DTYPES[dtype][0])


def bench_input(kind: str, rank: int, n: int, count: int, dtype: str) -> np.ndarray:
    per_rank = count // n if kind == "all_gather" else count
    return _store(_values(rank, per_rank), dtype)


def _expected(kind, rank, n, count, dtype, redop, root) -> np.ndarray | None:
    vals = [_values(r, count // n if kind == "all_gather" else count) for r in range(n)]
    op = ReduceOp.parse(redop)
    if kind == "all_gather":
        return np.concatenate(vals)
    if kind == "broadcast":
        return vals[root]
    fn = {ReduceOp.SUM: np.sum, ReduceOp.AVG: np.mean, ReduceOp.MAX: np.max, ReduceOp.MIN: np.min}[op]
    total = fn(np.stack(vals), axis=0)
    if kind == "reduce_scatter":
        a, b = split(count, n)[rank]
        return total[a:b]
    if kind == "reduce" and rank != root:
        return vals[rank]
    return total


def count_wrong(kind, out, rank, n, count, dtype, redop, root) -> int:
    want = _store(_expected(kind, rank, n, count, dtype, redop, root), dtype)
    if out.size != want.size:
        return max(out.size, want.size)
    return int(np.count_nonzero(out != want))
