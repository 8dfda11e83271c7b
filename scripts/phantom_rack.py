"""A rack of phantom cards on this host: launch, place a model, run one decode step; wall time and host memory.

    python -m scripts.phantom_rack [--cards 64] [--tp 4] [--model llama3-8b] [--batch 8] [--context 2048]

Host memory is sampled every 50 ms while the rack is up: the sum of the
resident memory of the host process and every card (RSS counts shared library
pages once per process, so it overstates; USS, pages unique to each process,
understates by the shared ones), and the peak of each sum is reported.
"""
from __future__ import annotations

import argparse
import threading
import time

import psutil

from devices.memory import fmt_bytes
from rsd_runtime.cli import DefaultsFormatter
from rsd_runtime.perf import PerfRunner


def sample(stop: threading.Event, peak: dict) -> None:
    me = psutil.Process()
    while not stop.wait(0.05):
        rss = uss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss
            uss += info.uss
        peak["rss"] = max(peak.get("rss", 0), rss)
        peak["uss"] = max(peak.get("uss", 0), uss)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.phantom_rack", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--cards", type=int, default=64)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--device", default="atom-plus")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    args = p.parse_args(argv)
    if args.cards % args.tp:
        raise SystemExit(f"--cards {args.cards} is not a multiple of --tp {args.tp}")
    stop, peak = threading.Event(), {}
    watcher = threading.Thread(target=sample, args=(stop, peak), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    with PerfRunner(args.model, tp=args.tp, instances=args.cards // args.tp, device=args.device,
                    backend="cards") as runner:  # card processes: what the rack costs this host
        t_up = time.perf_counter()
        emu = runner.step([(1, args.context)] * args.batch)
        t_step = time.perf_counter()
    t_down = time.perf_counter()
    stop.set()
    watcher.join()
    print(f"{args.cards} phantom {args.device} cards: {args.cards // args.tp} instances of {args.model} at tp={args.tp}")
    print(f"  launch + place weights + install streams: {t_up - t0:7.2f} s   [wall clock]")
    print(f"  one decode step, batch {args.batch} at context {args.context}: {t_step - t_up:7.2f} s   [wall clock]")
    print(f"  shutdown: {t_down - t_step:7.2f} s   [wall clock]")
    print(f"  the same decode step on the emulated clock: {emu / 1e6:.3f} ms")
    print(f"  peak host memory, all processes: RSS {fmt_bytes(peak.get('rss', 0))}, USS {fmt_bytes(peak.get('uss', 0))}")
    return 0


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m scripts.phantom_rack")
