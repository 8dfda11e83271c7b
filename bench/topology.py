"""The PCIe-fabric study: collective bus bandwidth of the five study topologies, side by side.

    python -m bench.topology --json results/topology.json --png results/topology.png

For every study topology (two boxes of 8 MI300X-class cards, see
interconnect/topo_study.py), every op and size: the emulated time of one call
over all 16 cards from a common clock of 0, with the default ring (group-rank
order, one channel) and with the rings searched for the topology
(``ring:search``). The calls run in the in-process simulation of phantom cards
(``interconnect.sim``), which gives the phantom cards' figures exactly
(tests/interconnect/test_sim.py); ``--verify`` also runs the first topology's
first row on 16 phantom card processes and checks the figure is the same.
Prints one busbw table (GB/s, default rings) with the topologies side by
side, then default against searched rings on each, and draws both.
"""
from __future__ import annotations

import argparse
import time

from bench.common import BUS_FACTOR, human_bytes, write_json
from devices.spec import PRESETS, get_spec
from interconnect import ring_search, sim
from interconnect.emulation import memory_reduce_ns
from interconnect.topology import get_topology

STUDY = ["1s-1rp-std-cascade", "1s-2rp-std-cascade", "1s-2rp-split-cascade", "2s-2rp-std-flat",
         "2s-2rp-split-flat"]
OPS = ["all_gather", "all_reduce", "broadcast", "reduce_scatter"]
RINGS = {"default": "ring", "search": "ring:search"}
DTYPE, ITEM = "float32", 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.topology", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--topologies", nargs="+", default=STUDY, help="presets or .toml files")
    p.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    p.add_argument("--sizes", nargs="+", type=int, default=[256 << 20, 1 << 30], help="bytes per call")
    p.add_argument("--device", default="gpu-mi300x", choices=list(PRESETS), help="sets the reduction speed")
    p.add_argument("--verify", action="store_true", help="check one row against 16 phantom card processes")
    p.add_argument("--json", metavar="PATH", help="write the config and one record per row")
    p.add_argument("--png", metavar="PATH", help="draw busbw per topology, default and searched rings")
    return p.parse_args(argv)


def count_of(op: str, nbytes: int, n: int) -> int:
    """Elements per call as bench.collectives counts them (all_gather: per rank's input)."""
    count = nbytes // ITEM
    count -= count % n
    return count // n if op == "all_gather" else count


def emulated_ns(topo, op: str, algo: str, nbytes: int, reduce_ns) -> int:
    cards = list(range(topo.num_cards))
    call = sim.Call(op, count_of(op, nbytes, len(cards)), DTYPE, algo)
    return max(c for c, _, _ in sim.simulate(call, cards, topo, reduce_ns, [(0, 0, 0)] * len(cards)))


def measure(args) -> list[dict]:
    spec = get_spec(args.device)
    reduce_ns = memory_reduce_ns(spec.memory_bw, spec.memory_efficiency)
    records = []
    for name in args.topologies:
        topo = get_topology(name, None)
        n = topo.num_cards
        channels = len(ring_search.search(topo, tuple(range(n))).channels(n))
        for op in args.ops:
            for nbytes in args.sizes:
                real = count_of(op, nbytes, n) * ITEM * (n if op == "all_gather" else 1)
                for rings, algo in RINGS.items():
                    ns = emulated_ns(topo, op, algo, nbytes, reduce_ns)
                    records.append({"topology": name, "op": op, "rings": rings, "bytes": real, "cards": n,
                                    "channels": channels if rings == "search" else 1, "emu_us": ns / 1e3,
                                    "emu_busbw_gbps": real / ns * BUS_FACTOR[op](n)})
    return records


def print_tables(records: list[dict], args) -> None:
    def busbw(name, op, size, rings):
        return next(r["emu_busbw_gbps"] for r in records
                    if (r["topology"], r["op"], r["bytes"], r["rings"]) == (name, op, size, rings))

    names = args.topologies
    width = max(12, *map(len, names))
    print(f"\n# busbw (GB/s, emulated clock), default rings, {records[0]['cards']} cards, {args.device}")
    print(f"#{'op':>15} {'size':>9}  " + " ".join(f"{n:>{width}}" for n in names))
    for op in args.ops:
        for size in sorted({r["bytes"] for r in records if r["op"] == op}):
            print(f" {op:>15} {human_bytes(size):>9}  "
                  + " ".join(f"{busbw(n, op, size, 'default'):>{width}.2f}" for n in names))
    print("\n# default against searched rings: busbw (GB/s, emulated clock) at the largest size")
    print(f"#{'topology':>{width}} {'channels':>8}  " + " ".join(f"{op + ' d/s':>27}" for op in args.ops))
    for name in names:
        ch = next(r["channels"] for r in records if r["topology"] == name and r["rings"] == "search")
        cells = []
        for op in args.ops:
            big = max(r["bytes"] for r in records if r["op"] == op)
            d, s = busbw(name, op, big, "default"), busbw(name, op, big, "search")
            cells.append(f"{d:>9.2f} / {s:>7.2f} ({s / d:4.2f}x)")
        print(f" {name:>{width}} {ch:>8}  " + " ".join(f"{c:>27}" for c in cells))


def verify(args, records: list[dict]) -> None:
    from rsd_runtime.cluster import Cluster

    r = records[1]  # the first row with searched rings: the search runs on every card too
    topo = get_topology(r["topology"], None)
    count = r["bytes"] // ITEM  # bench_collective counts the whole buffer (all_gather: the output)
    with Cluster(num_devices=topo.num_cards, device=args.device, phantom=True, topology=r["topology"],
                 shm_prefix="rsdtopo") as cluster:
        res = cluster.bench_collective(r["op"], count, DTYPE, algo=RINGS[r["rings"]], warmup=0, iters=1)
    same = res["emu_ns"] == round(r["emu_us"] * 1e3)
    print(f"\n# phantom cards: {r['topology']} {r['op']} {human_bytes(r['bytes'])} {r['rings']} rings: "
          f"{res['emu_ns']} ns, simulation {round(r['emu_us'] * 1e3)} ns: {'same' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit(1)


def plot(path: str, records: list[dict], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install -e '.[bench]'") from None
    fig, axes = plt.subplots(1, len(args.ops), figsize=(4.5 * len(args.ops), 4.5), dpi=120, squeeze=False)
    x = range(len(args.topologies))
    for ax, op in zip(axes[0], args.ops):
        big = max(r["bytes"] for r in records if r["op"] == op)
        for k, rings in enumerate(RINGS):
            ys = [next(r["emu_busbw_gbps"] for r in records if (r["topology"], r["op"], r["bytes"], r["rings"])
                       == (name, op, big, rings)) for name in args.topologies]
            ax.bar([i + 0.4 * k - 0.2 for i in x], ys, width=0.4, label=f"{rings} rings")
        ax.set_xticks(list(x), args.topologies, rotation=35, ha="right", fontsize=7)
        ax.set(ylabel="busbw (GB/s, emulated)", title=f"{op}, {human_bytes(big)}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.sizes) < 1:
        raise ValueError(f"--sizes must be positive, got {args.sizes}")
    print(f"# rsd-runtime topology study: {', '.join(args.topologies)}; {', '.join(args.ops)}; "
          f"sizes {', '.join(human_bytes(s) for s in args.sizes)}; emulated clock, phantom cards simulated in process")
    t0 = time.perf_counter()
    records = measure(args)
    print_tables(records, args)
    print(f"\n# wall time {time.perf_counter() - t0:.1f} s")
    if args.verify:
        verify(args, records)
    if args.json:
        write_json(args.json, "topology", {k: v for k, v in vars(args).items() if k != "json"}, records)
        print(f"# wrote {args.json}")
    if args.png:
        plot(args.png, records, args)
        print(f"# wrote {args.png}")
    return 0


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.topology")
