"""rsd-launch: start emulated cards and work with them.

    rsd-launch --devices 4 status          # -smi style table, then shut down
    rsd-launch sweep                       # remove segments left by dead runs

Each sub-command registers itself in ``COMMANDS``; later layers (generate,
bench, serve) add theirs the same way.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from devices import shm
from devices.memory import fmt_bytes
from devices.spec import PRESETS
from rsd_runtime.errors import CardDied, ClusterError

COMMANDS: dict[str, tuple[str, callable, callable]] = {}  # name -> (help, add_arguments, run)


def command(name: str, help: str, add_arguments=lambda p: None):
    def register(fn):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn
    return register


def cluster_from_args(args):
    from rsd_runtime.cluster import Cluster

    return Cluster(num_devices=args.devices, device=args.device, phantom=args.phantom, shm_prefix=args.shm_prefix)


def start_with_progress(cluster):
    from tqdm import tqdm

    with tqdm(total=cluster.num_devices, desc="starting cards", unit="card", file=sys.stderr,
              disable=not sys.stderr.isatty(), leave=False) as bar:
        return cluster.start(progress=bar.update)


def format_status(rows: list[dict]) -> str:
    head = f"{'card':>4}  {'pid':>7}  {'state':<8} {'memory used / capacity':>26}  {'host RSS':>10}  {'emu clock':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = "-" if r.get("memory_used") is None else (
            f"{fmt_bytes(r['memory_used'])} / {fmt_bytes(r['memory_capacity'])}")
        rss = "-" if r.get("host_rss") is None else fmt_bytes(r["host_rss"])
        clock = "-" if r.get("clock_ns") is None else f"{r['clock_ns'] / 1e3:.3f} us"
        lines.append(f"{r['card']:>4}  {r['pid'] or '-':>7}  {r['state']:<8} {mem:>26}  {rss:>10}  {clock:>12}")
        if r["state"] == "dead":
            lines.append(f"      card {r['card']} {r['how']}")
    return "\n".join(lines)


@command("status", "start the cards, print one row per card (-smi style), shut down")
def cmd_status(args) -> int:
    cluster = cluster_from_args(args)
    with start_with_progress(cluster):
        rows = cluster.status()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            spec = cluster.spec
            print(f"rsd-runtime  run {cluster.run_name}  {cluster.num_devices} x {spec.name}"
                  f"{' (phantom)' if cluster.phantom else ''}  emulated clock")
            print(format_status(rows))
    return 0


def _sweep_args(p):
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")


@command("sweep", "remove shared-memory segments left by runs whose host is gone", _sweep_args)
def cmd_sweep(args) -> int:
    report = shm.sweep(args.shm_prefix, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for run, names in report.removed.items():
        print(f"{verb} {len(names)} segments of stale run {run}")
    for run, names in report.live.items():
        print(f"kept {len(names)} segments of live run {run}")
    if report.foreign:
        print(f"error: {len(report.foreign)} segments in {shm.SHM_DIR} carry the prefix {args.shm_prefix!r} but "
              f"are not this user's rsd-runtime segments; left untouched:", file=sys.stderr)
        for name in report.foreign:
            print(f"  {shm.SHM_DIR / name}", file=sys.stderr)
        return 2
    if not (report.removed or report.live):
        print("nothing to sweep")
    return 0


BENCHMARKS = {"collectives": "bench.collectives", "launch": "bench.launch"}


def _bench_args(p):
    p.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark program to run")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="its options (see: rsd-launch bench NAME --help)")


@command("bench", "run a benchmark program (collectives, launch); options after its name go to it", _bench_args)
def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(BENCHMARKS[args.benchmark]).main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rsd-launch",
        description="Start N emulated neural-engine cards (one OS process each) and run a job on them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--devices", "-n", type=int, default=4, metavar="N", help="number of cards")
    p.add_argument("--device", default="atom-plus", help=f"device preset: {', '.join(PRESETS)}")
    p.add_argument("--phantom", action="store_true", help="cards account for memory and time but hold no bytes")
    p.add_argument("--shm-prefix", default=shm.DEFAULT_PREFIX, help="prefix of the run's /dev/shm segments")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="rsd-launch: %(message)s")
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print("rsd-launch: interrupted; cards shut down", file=sys.stderr)
        return 130
    except (ClusterError, CardDied, ValueError, shm.SegmentError, MemoryError) as exc:
        print(f"rsd-launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
