"""Reference measurement of torch.distributed's gloo backend, on loopback, in real processes.

    python -m bench.gloo_ref --world-size 4 --min-bytes 4096 --max-bytes 67108864 --ops all_reduce

The collectives benchmark calls `run_gloo` in the same run as our fabric and prints
ratios against it. Conventions follow nccl-tests: a size is the bytes of one rank's
buffer (the whole output of all_gather, the whole input of reduce_scatter), the time
of an iteration is the slowest rank's mean over `iters` back-to-back calls, and
busbw = algbw * factor (2(n-1)/n for all_reduce, (n-1)/n for all_gather and
reduce_scatter, 1 for broadcast and reduce; nccl-tests doc/PERFORMANCE.md).

Each rank is `python -m bench.gloo_ref --worker SPEC --rank R`, one torch thread,
rendezvous over tcp://127.0.0.1 with GLOO_SOCKET_IFNAME=lo. Rank 0 writes the records
to a JSON file the parent reads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import BUS_FACTOR, sweep
from rsd_runtime.cli import DefaultsFormatter

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce")
_REPO = Path(__file__).resolve().parent.parent
_POLL_S = 0.05
_TAIL_CHARS = 3000


def run_gloo(world_size: int, sizes: list[int], ops: list[str], *, dtype: str = "float32",
             iters: int = 20, warmup: int = 5, timeout_s: float = 600) -> list[dict]:
    """Time `ops` at each size in `sizes` (bytes per rank buffer) on `world_size` gloo processes.

    Returns one record per (op, size) whose element count is not 0, in `ops` then `sizes`
    order: op, bytes (as run: count * element size), count (elements of the buffer the
    size names), dtype, world_size, wall_us, algbw_gbps, busbw_gbps, wrong (elements that
    differed from the expected result after one checked call, summed over ranks), backend,
    impl (the torch.distributed function used) and error (None, or why gloo could not run
    the op; the numbers are then None). Raises RuntimeError if a worker fails or the run
    takes longer than `timeout_s`; no worker is left running either way.
    """
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {list(OPS)}")
    if world_size < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need world_size >= 1, iters >= 1, warmup >= 0; got {world_size}, {iters}, {warmup}")
    _torch_dtype(dtype)
    with tempfile.TemporaryDirectory(prefix="gloo_ref_") as tmp:
        tmp = Path(tmp)
        spec = {"world_size": world_size, "init_method": f"tcp://127.0.0.1:{_free_port()}",
                "sizes": list(sizes), "ops": list(ops), "dtype": dtype, "iters": iters,
                "warmup": warmup, "timeout_s": timeout_s, "out": str(tmp / "records.json")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        _launch(spec, tmp, timeout_s)
        return json.loads((tmp / "records.json").read_text())["records"]


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(spec: dict, tmp: Path, timeout_s: float) -> None:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])))
    logs = [tmp / f"rank{r}.err" for r in range(spec["world_size"])]
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s
    try:
        for rank, log in enumerate(logs):
            with open(log, "wb") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.gloo_ref", "--worker", str(tmp / "spec.json"), "--rank", str(rank)],
                    cwd=_REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err))
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                raise RuntimeError("gloo worker failed: " + "\n".join(
                    f"rank {r} exited with {codes[r]}; stderr tail:\n{_tail(logs[r])}" for r in failed))
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gloo run timed out after {timeout_s} s; rank 0 stderr tail:\n{_tail(logs[0])}")
            time.sleep(_POLL_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_TAIL_CHARS:]
    except OSError as e:
        return f"<no stderr: {e}>"


# ---- worker side ----------------------------------------------------------------------------

_CANDIDATES = {
    "all_gather": ("all_gather_single", "all_gather_into_tensor", "all_gather"),
    "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter"),
}


def _call(name: str, out: torch.Tensor, inp: torch.Tensor, n: int) -> None:
    if name == "all_gather":
        dist.all_gather(list(out.chunk(n)), inp)
    elif name == "reduce_scatter":
        dist.reduce_scatter(out, list(inp.chunk(n)))
    else:
        getattr(dist, name)(out, inp)


def _case(op: str, count: int, rank: int, n: int, dt: torch.dtype):
    """Buffers for one (op, count): (fill, run, wrong), where `run(impl)` makes one call.

    Inputs are rank + 1 (reduce_scatter: (rank + 1) * (chunk + 1), so a misplaced chunk
    shows), which keeps every expected value an exact small integer in any dtype.
    """
    total = n * (n + 1) // 2
    m = count // n
    if op in ("all_reduce", "reduce"):
        buf = torch.empty(count, dtype=dt)
        run = (lambda impl: dist.all_reduce(buf)) if op == "all_reduce" else (lambda impl: dist.reduce(buf, dst=0))
        checked = op == "all_reduce" or rank == 0
        return (lambda: buf.fill_(rank + 1)), run, (lambda: int((buf != total).sum()) if checked else 0)
    if op == "broadcast":
        buf = torch.empty(count, dtype=dt)
        return (lambda: buf.fill_(1 if rank == 0 else 0)), (lambda impl: dist.broadcast(buf, src=0)), \
            (lambda: int((buf != 1).sum()))
    if op == "all_gather":
        inp, out = torch.full((m,), rank + 1, dtype=dt), torch.empty(m * n, dtype=dt)
        expected = torch.arange(1, n + 1, dtype=dt).repeat_interleave(m)
        return out.zero_, (lambda impl: _call(impl, out, inp, n)), (lambda: int((out != expected).sum()))
    inp, out = torch.empty(m * n, dtype=dt), torch.empty(m, dtype=dt)
    chunks = torch.arange(1, n + 1, dtype=dt).repeat_interleave(m)

    def fill():
        inp.copy_(chunks).mul_(rank + 1)
        out.zero_()
    return fill, (lambda impl: _call(impl, out, inp, n)), (lambda: int((out != total * (rank + 1)).sum()))


def _first_call(op: str, fill, run, impls: dict) -> tuple[str | None, str | None]:
    """Make the checked call; returns (function used, None) or (None, why gloo cannot run op).

    For all_gather and reduce_scatter the first form gloo accepts is used, and remembered
    in `impls` for the later sizes.
    """
    if op not in _CANDIDATES:
        run(op)
        return op, None
    if op in impls:
        if impls[op][0]:
            run(impls[op][0])
        return impls[op]
    errors = []
    for name in (c for c in _CANDIDATES[op] if hasattr(dist, c)):
        try:
            run(name)
            impls[op] = (name, None)
            return impls[op]
        except (RuntimeError, NotImplementedError, ValueError) as e:
            errors.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            fill()
    impls[op] = (None, "unsupported by gloo in torch " + torch.__version__ + "; " + "; ".join(errors))
    return impls[op]


def _measure(op: str, size: int, spec: dict, rank: int, impls: dict) -> dict | None:
    """One (op, size) on this rank: check once, warm up, barrier, time; rank 0 returns the record."""
    n, dt = spec["world_size"], _torch_dtype(spec["dtype"])
    count = size // dt.itemsize
    if op in ("all_gather", "reduce_scatter"):
        count = count // n * n
    if count == 0:
        return None
    rec = {"op": op, "bytes": count * dt.itemsize, "count": count, "dtype": spec["dtype"], "world_size": n,
           "wall_us": None, "algbw_gbps": None, "busbw_gbps": None, "wrong": None, "backend": "gloo"}
    fill, run, wrong = _case(op, count, rank, n, dt)
    fill()
    impl, error = _first_call(op, fill, run, impls)
    rec.update(impl=impl, error=error)
    if error:
        return rec
    num_wrong = wrong()
    for _ in range(spec["warmup"]):
        run(impl)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(spec["iters"]):
        run(impl)
    elapsed = time.perf_counter() - t0
    mine = torch.tensor([elapsed, num_wrong], dtype=torch.float64)
    gathered = [torch.empty(2, dtype=torch.float64) for _ in range(n)] if rank == 0 else None
    dist.gather(mine, gathered, dst=0)
    if rank != 0:
        return rec
    wall_s = max(float(g[0]) for g in gathered) / spec["iters"]
    algbw = rec["bytes"] / wall_s / 1e9
    rec.update(wall_us=wall_s * 1e6, algbw_gbps=algbw, busbw_gbps=algbw * BUS_FACTOR[op](n),
               wrong=int(sum(float(g[1]) for g in gathered)))
    return rec


def _worker(spec_path: str, rank: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=spec["init_method"], rank=rank, world_size=spec["world_size"],
                            timeout=timedelta(seconds=spec["timeout_s"]))
    impls: dict = {}
    records = [r for op in spec["ops"] for size in spec["sizes"] if (r := _measure(op, size, spec, rank, impls))]
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"records": records}))


# ---- program --------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gloo_ref", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--min-bytes", type=int, default=4096)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--step-factor", type=int, default=2, help="multiply the size by this between steps")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole run")
    p.add_argument("--json", metavar="PATH", help="also write the config and records here")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.rank)
        return 0

    sizes = sweep(args.min_bytes, args.max_bytes, args.step_factor)
    records = run_gloo(args.world_size, sizes, args.ops, dtype=args.dtype, iters=args.iters,
                       warmup=args.warmup, timeout_s=args.timeout)
    print(f"gloo, {args.world_size} ranks, {args.dtype}, {os.cpu_count()} cpus, "
          f"slowest rank's mean of {args.iters} iters after {args.warmup} warm-up [wall clock]")
    print(f"{'op':>14}  {'bytes':>10}  {'wall_us':>10}  {'algbw GB/s':>10}  {'busbw GB/s':>10}  {'wrong':>6}")
    for r in records:
        if r["error"]:
            print(f"{r['op']:>14}  {r['bytes']:>10}  {r['error']}")
        else:
            print(f"{r['op']:>14}  {r['bytes']:>10}  {r['wall_us']:>10.1f}  {r['algbw_gbps']:>10.3f}  "
                  f"{r['busbw_gbps']:>10.3f}  {r['wrong']:>6}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "rank", "json")}
        with open(args.json, "w") as f:
            json.dump({"benchmark": "gloo_ref", "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                         "torch": torch.__version__},
                       "config": config, "sizes": sizes, "records": records}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.gloo_ref")
