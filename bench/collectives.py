"""Collectives benchmark in the style of nccl-tests, on both clocks.

    python -m bench.collectives --devices 4 --ops all_reduce --algos ring tree one-shot auto \\
        --min-bytes 4096 --max-bytes 67108864 --vs-gloo --json results/collectives.json
    python -m bench.collectives --topology 2s-2rp-split-flat --device gpu-mi300x --devices 16 --phantom \\
        --algos ring --rings default search "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15|15 14 13 12 11 10 9 8 7 6 5 4 3 2 1 0"

For every op, algorithm and size: the cards generate their inputs (small
integers, exact in every dtype), run ``--warmup`` calls, one call from a common
emulated clock of 0 (the emulated time: slowest card), then ``--iters`` timed
calls back to back (the wall time: slowest card's mean), and count the wrong
elements of the checked call. Buffers are registered with the fabric window,
as nccl-tests' buffers live in device memory. ``--vs-gloo`` then runs the same
sizes on torch.distributed's gloo backend with as many processes, in the same
run (after the cards are down), and prints our figure over gloo's.
"""
from __future__ import annotations

import argparse
import sys

from bench.common import BUS_FACTOR, human_bytes, sweep, write_json
from devices.spec import PRESETS
from interconnect import wire
from interconnect import ring_search
from interconnect.collectives import ALGO_NAMES, check_algo
from interconnect.links import link_names
from interconnect.topology import topology_names
from rsd_runtime.cli import DefaultsFormatter
from rsd_runtime.cluster import Cluster

OPS = tuple(BUS_FACTOR)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.collectives", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--devices", "-n", type=int, default=4, help="cards, all in one group")
    p.add_argument("--ops", nargs="+", choices=OPS, default=["all_reduce"])
    p.add_argument("--algos", nargs="+", choices=ALGO_NAMES, default=["ring", "tree", "one-shot", "auto"])
    p.add_argument("--rings", nargs="+", metavar="RINGS",
                   help="run the ring algorithm once per RINGS: default, search, or orders of group ranks "
                        "split by | (one channel each, as NCCL_RINGS)")
    p.add_argument("--min-bytes", "-b", type=int, default=4096, help="smallest message, bytes (nccl-tests -b)")
    p.add_argument("--max-bytes", "-e", type=int, default=64 << 20, help="largest message, bytes (nccl-tests -e)")
    p.add_argument("--step-factor", "-f", type=int, default=4, help="size multiplier between rows")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "int32", "int64"])
    p.add_argument("--redop", default="sum", choices=["sum", "max", "min"])
    p.add_argument("--root", type=int, default=0, help="root of broadcast and reduce")
    p.add_argument("--link", choices=link_names(), help="the cards' own link (default: the topology's)")
    p.add_argument("--topology", default="switch",
                   help=f"preset ({', '.join(topology_names())}) or a .toml file")
    p.add_argument("--device", default="atom-plus", help=f"device preset ({', '.join(PRESETS)}) or a .toml card file")
    p.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    p.add_argument("--phantom", action="store_true", help="emulated clock only: no bytes move")
    p.add_argument("--iters", type=int, default=20, help="timed calls per row (nccl-tests -n)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (nccl-tests -w)")
    p.add_argument("--vs-gloo", action="store_true", help="also run gloo on the same sizes and print ratios")
    p.add_argument("--json", metavar="PATH", help="write the config and one record per row")
    p.add_argument("--shm-prefix", default="rsdbench", help="prefix of the run's /dev/shm segments")
    args = p.parse_args(argv)
    args.algos = with_rings(args.algos, args.rings)
    return args


def with_rings(algos: list[str], rings: list[str] | None) -> list[str]:
    """``algos`` with ``ring`` replaced by one ``ring:RINGS`` per ``--rings`` entry (checked)."""
    if not rings:
        return algos
    named = [f"{ring_search.PREFIX}{r}" for r in rings]
    for name in named:
        check_algo(name)
    if "ring" not in algos:
        return [*algos, *named]
    i = algos.index("ring")
    return [*algos[:i], *named, *[a for a in algos[i + 1:] if a != "ring"]]


def measure(args) -> list[dict]:
    n, item = args.devices, wire.itemsize(args.dtype)
    records = []
    with Cluster(num_devices=n, device=args.device, phantom=args.phantom, topology=args.topology, link=args.link,
                 transport=args.transport, shm_prefix=args.shm_prefix) as cluster:
        for op in args.ops:
            for algo in args.algos:
                for size in sweep(args.min_bytes, args.max_bytes, args.step_factor):
                    count = size // item
                    if op in ("all_gather", "reduce_scatter"):
                        count -= count % n
                    if count == 0:
                        continue
                    res = cluster.bench_collective(op, count, args.dtype, algo=algo, op=args.redop, root=args.root,
                                                   warmup=args.warmup, iters=args.iters)
                    records.append(record(op, algo, n, count * item, count, args, res))
                    print_row(records[-1], first=len(records) == 1 or records[-2]["algo"] != algo
                              or records[-2]["op"] != op)
    return records


def record(op, algo, n, nbytes, count, args, res) -> dict:
    wall_us, emu_us = res["wall_ns"] / 1e3, res["emu_ns"] / 1e3
    factor = BUS_FACTOR[op](n)
    wall_alg, emu_alg = nbytes / res["wall_ns"], nbytes / res["emu_ns"]  # bytes/ns = GB/s
    return {"op": op, "algo": algo, "world_size": n, "bytes": nbytes, "count": count, "dtype": args.dtype,
            "redop": args.redop if op in ("all_reduce", "reduce_scatter", "reduce") else None,
            "root": args.root if op in ("broadcast", "reduce") else None,
            "wall_us": wall_us, "wall_algbw_gbps": wall_alg, "wall_busbw_gbps": wall_alg * factor,
            "emu_us": emu_us, "emu_algbw_gbps": emu_alg, "emu_busbw_gbps": emu_alg * factor,
            "wrong": res["wrong"], "link": args.link or "default", "topology": args.topology}


def print_row(r: dict, first: bool) -> None:
    if first:
        print(f"\n# {r['op']}  algo={r['algo']}  {r['world_size']} cards  {r['topology']} / {r['link']}")
        print(f"#{'':>38}{'-------- wall clock --------':>32}  {'------ emulated clock ------':>30}")
        print(f"#{'size':>10} {'count':>11} {'type':>9} {'redop':>6} {'root':>5}   {'time':>10} "
              f"{'algbw':>8} {'busbw':>8}   {'time':>10} {'algbw':>8} {'busbw':>8}  {'#wrong':>6}")
        print(f"#{'(B)':>10} {'(elements)':>11} {'':>9} {'':>6} {'':>5}   {'(us)':>10} "
              f"{'(GB/s)':>8} {'(GB/s)':>8}   {'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8}")
    wrong = "n/a" if r["wrong"] is None else str(r["wrong"])
    print(f" {r['bytes']:>10} {r['count']:>11} {r['dtype']:>9} {r['redop'] or '-':>6} "
          f"{'-' if r['root'] is None else r['root']:>5}   {r['wall_us']:>10.1f} {r['wall_algbw_gbps']:>8.3f} "
          f"{r['wall_busbw_gbps']:>8.3f}   {r['emu_us']:>10.2f} {r['emu_algbw_gbps']:>8.2f} "
          f"{r['emu_busbw_gbps']:>8.2f}  {wrong:>6}", flush=True)


def print_averages(records: list[dict]) -> None:
    """nccl-tests' closing line, per op and algorithm: the mean bus bandwidth over the sizes run."""
    print()
    for key in dict.fromkeys((r["op"], r["algo"]) for r in records):
        rows = [r for r in records if (r["op"], r["algo"]) == key]
        wall = sum(r["wall_busbw_gbps"] for r in rows) / len(rows)
        emu = sum(r["emu_busbw_gbps"] for r in rows) / len(rows)
        print(f"# Avg bus bandwidth    : {wall:8.3f} GB/s wall, {emu:8.3f} GB/s emulated   "
              f"({key[0]}, {key[1]}, {len(rows)} sizes)")


def versus_gloo(args, records: list[dict]) -> list[dict]:
    from bench.gloo_ref import run_gloo

    sizes = sorted({r["bytes"] for r in records})
    gloo = run_gloo(args.devices, sizes, args.ops, dtype=args.dtype, iters=args.iters, warmup=args.warmup)
    by_key = {(g["op"], g["bytes"]): g for g in gloo if not g.get("error")}
    print(f"\n# versus gloo, {args.devices} processes, same sizes, same run [wall clock]")
    print(f"#{'op':>14} {'algo':>9} {'size':>10}   {'ours(us)':>10} {'gloo(us)':>10} {'time ratio':>10}   "
          f"{'ours busbw':>10} {'gloo busbw':>10} {'busbw ratio':>11}")
    for r in records:
        g = by_key.get((r["op"], r["bytes"]))
        if g is None:
            continue
        r["gloo_wall_us"], r["gloo_busbw_gbps"] = g["wall_us"], g["busbw_gbps"]
        r["time_vs_gloo"] = r["wall_us"] / g["wall_us"]
        r["busbw_vs_gloo"] = r["wall_busbw_gbps"] / g["busbw_gbps"]
        print(f" {r['op']:>14} {r['algo']:>9} {human_bytes(r['bytes']):>10}   {r['wall_us']:>10.1f} "
              f"{g['wall_us']:>10.1f} {r['time_vs_gloo']:>9.3f}x   {r['wall_busbw_gbps']:>10.3f} "
              f"{g['busbw_gbps']:>10.3f} {r['busbw_vs_gloo']:>10.2f}x")
    return gloo


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"# rsd-runtime collectives: {args.devices} x {args.device}, {args.topology} over "
          f"{args.link or 'its default link'}, "
          f"{args.transport}{', phantom' if args.phantom else ''}; warm-up {args.warmup}, "
          f"wall = slowest card's mean of {args.iters}, emulated = one call from clock 0")
    records = measure(args)
    print_averages(records)
    gloo = versus_gloo(args, records) if args.vs_gloo else None
    wrong = sum(r["wrong"] or 0 for r in records)
    print(f"\n# out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, "collectives", config, records, gloo=gloo)
        print(f"# wrote {args.json}")
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.collectives")
