"""Launch benchmark: wall time to bring N cards up and down, host memory per idle card.

    python -m bench.launch [--devices 1 4 8 16] [--repeats 3] [--json PATH]

Wall clock only: launching is host work, there is nothing to emulate. "up" is
from the first spawn to the last card's hello; "down" is shutdown, including
the removal of every segment. Memory per idle card is read from the card
processes themselves: RSS, and USS (pages no other process shares, so what one
more card really costs).
"""
from __future__ import annotations

import argparse
import statistics
import time

import psutil

from bench.common import write_json
from rsd_runtime.cli import DefaultsFormatter
from rsd_runtime.cluster import Cluster


def measure(n: int, prefix: str) -> dict:
    t0 = time.perf_counter()
    cluster = Cluster(num_devices=n, shm_prefix=prefix).start()
    t1 = time.perf_counter()
    rss, uss = [], []
    for proc in cluster.procs.values():
        info = psutil.Process(proc.pid).memory_full_info()
        rss.append(info.rss)
        uss.append(info.uss)
    t2 = time.perf_counter()
    cluster.shutdown()
    t3 = time.perf_counter()
    return {"up_s": t1 - t0, "down_s": t3 - t2, "rss": statistics.mean(rss), "uss": statistics.mean(uss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.launch", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per size (the median is reported)")
    p.add_argument("--shm-prefix", default="rsdbench")
    p.add_argument("--json", metavar="PATH", help="also write the config and records here")
    args = p.parse_args(argv)

    measure(1, args.shm_prefix)  # warm-up: page cache, imports
    records = []
    print(f"{'cards':>5}  {'up (s)':>8}  {'down (s)':>8}  {'up+down (s)':>11}  "
          f"{'RSS/card (MiB)':>14}  {'USS/card (MiB)':>14}   [wall clock, median of {args.repeats}]")
    for n in args.devices:
        runs = [measure(n, args.shm_prefix) for _ in range(args.repeats)]
        rec = {
            "devices": n,
            "up_s": statistics.median(r["up_s"] for r in runs),
            "down_s": statistics.median(r["down_s"] for r in runs),
            "total_s": statistics.median(r["up_s"] + r["down_s"] for r in runs),
            "rss_per_card_mib": statistics.median(r["rss"] for r in runs) / 2**20,
            "uss_per_card_mib": statistics.median(r["uss"] for r in runs) / 2**20,
            "clock": "wall",
        }
        records.append(rec)
        print(f"{n:>5}  {rec['up_s']:>8.3f}  {rec['down_s']:>8.3f}  {rec['total_s']:>11.3f}  "
              f"{rec['rss_per_card_mib']:>14.1f}  {rec['uss_per_card_mib']:>14.1f}")
    if args.json:
        write_json(args.json, "launch", vars(args), records)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.launch")
