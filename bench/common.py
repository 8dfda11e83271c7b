"""Conventions shared by the benchmark programs: bus bandwidth, size sweeps, result files."""
from __future__ import annotations

import json
import os
import platform
import time

# busbw = algbw * factor: the per-link load of a bandwidth-optimal algorithm, so that the
# figure compares to a link's speed whatever n is (nccl-tests doc/PERFORMANCE.md).
BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}


def sweep(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """min, min*f, min*f^2, ... up to max (nccl-tests -b/-e/-f)."""
    if min_bytes < 1 or max_bytes < min_bytes or factor < 2:
        raise ValueError(f"bad sweep: min {min_bytes}, max {max_bytes}, factor {factor}")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def write_json(path: str, benchmark: str, config: dict, records: list[dict], **extra) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    doc = {"benchmark": benchmark, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
           "config": config, "records": records, **extra}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


# Errors a benchmark reports as one line (exit 2) rather than a traceback: bad options, models
# that do not fit, cards that fail.
def _expected_errors() -> tuple:
    from devices.shm import SegmentError
    from rsd_runtime.errors import CardDied, CardError, ClusterError

    return (ValueError, MemoryError, OSError, ClusterError, CardDied, CardError, SegmentError)


def entry(main, prog: str):
    """Run a benchmark's ``main()`` as a program: one line and exit 2 on a known error, 130 on Ctrl-C."""
    import sys

    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; cards shut down", file=sys.stderr)
        code = 130
    except _expected_errors() as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear exit when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    return plt
