"""``rsd-launch calibrate``: fit a card's efficiency factors, launch overhead and host cost to measurements.

    rsd-launch calibrate --device atom-plus --measurements points.csv --out my-card.toml
    rsd-launch generate --device my-card.toml ...

The CSV has one measured point per row::

    model,tp,batch,input_len,output_len,ttft_s,tpot_s,use
    llama3-8b,4,1,2048,128,0.412,0.0197,fit
    llama3-8b,4,16,512,128,0.934,0.0221,check

``use`` is ``fit`` (the point is fitted) or ``check`` (only its error is
reported); fit on some points and judge the card by the error on the others.
Every point is run as ``bench.inference`` runs it (phantom cards in this
process, a static batch, chunked prefill of 2048 tokens) and the relative
errors of TTFT and TPOT are brought down by Levenberg-Marquardt least squares
(numpy; finite-difference Jacobian) over:

* ``compute_efficiency`` and ``memory_efficiency`` (0.01 .. 1),
* ``op_overhead_ns`` (>= 0),
* with ``--fit-host``, the host's cost per step (>= 0; serialised, charged as
  ``--host-overhead`` charges it), written to the card's ``extra.host_step_ns``.

The card written is a TOML file ``--device`` reads (``base`` = the device fitted).
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, replace

import numpy as np

from rsd_runtime.cli import COMMANDS, command

FIELDS = ("model", "tp", "batch", "input_len", "output_len", "ttft_s", "tpot_s")
NAMES = ("compute_efficiency", "memory_efficiency", "op_overhead_ns", "host_step_ns")
SCALE = np.array([1.0, 1.0, 1e3, 1e5])  # the fit moves numbers of order one
LOW = np.array([0.01, 0.01, 0.0, 0.0])
HIGH = np.array([1.0, 1.0, np.inf, np.inf])


@dataclass(slots=True)
class Point:
    model: str
    tp: int
    batch: int
    input_len: int
    output_len: int
    ttft_s: float | None
    tpot_s: float | None
    fit: bool = True


def read_points(path: str) -> list[Point]:
    """The measured points; ValueError naming the file, row and column of a bad value."""
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise ValueError(f"--measurements {path}: {exc.strerror}") from None
    with f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"--measurements {path}: no points (a header line and one row per point)")
    missing = [c for c in FIELDS if c not in rows[0]]
    if missing:
        raise ValueError(f"--measurements {path}: missing columns {missing}; needed: {', '.join(FIELDS)}")
    out = []
    for n, row in enumerate(rows, start=2):
        def num(col, kind):
            text = (row.get(col) or "").strip()
            if not text and col in ("ttft_s", "tpot_s"):
                return None
            try:
                v = kind(text)
            except ValueError:
                raise ValueError(f"--measurements {path}, line {n}: {col} must be a number, got {text!r}") from None
            if v <= 0:
                raise ValueError(f"--measurements {path}, line {n}: {col} must be > 0, got {text}")
            return v
        use = (row.get("use") or "fit").strip()
        if use not in ("fit", "check"):
            raise ValueError(f"--measurements {path}, line {n}: use must be fit or check, got {use!r}")
        p = Point(row["model"].strip(), num("tp", int), num("batch", int), num("input_len", int),
                  num("output_len", int), num("ttft_s", float), num("tpot_s", float), use == "fit")
        if p.ttft_s is None and p.tpot_s is None:
            raise ValueError(f"--measurements {path}, line {n}: give ttft_s, tpot_s or both")
        out.append(p)
    if not any(p.fit for p in out):
        raise ValueError(f"--measurements {path}: no point has use=fit")
    return out


def card(base, theta: np.ndarray):
    """The device spec and host the parameters stand for."""
    from rsd_runtime.host_spec import HostSpec

    spec = replace(base, compute_efficiency=float(theta[0]), memory_efficiency=float(theta[1]),
                   op_overhead_ns=int(round(theta[2])))
    host = None
    if len(theta) > 3:
        host = HostSpec("calibrated", "as measured", step_ns=int(round(theta[3])), seq_ns=0, request_ns=0,
                        sample_ns=0, detok_ns=0)
    return spec, host


_RUNNERS: dict = {}


def predict(point: Point, spec, host) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds on the emulated clock. One runner per (model, tp) is kept and given
    the candidate card: only the in-process instance is built again."""
    from rsd_runtime.perf import PerfRunner, batch_timing

    r = _RUNNERS.get((point.model, point.tp))
    if r is None:
        r = _RUNNERS[(point.model, point.tp)] = PerfRunner(point.model, tp=point.tp, device=spec)
    r.host, r._cache = host, {}
    for e in r.engines:
        e.runner = e.simulator(spec, e.runner.topology)
    bt = batch_timing(r, point.batch, point.input_len, point.output_len, decode_samples=3)
    return bt.ttft_ns * 1e-9, bt.tpot_ns * 1e-9


def residuals(points: list[Point], base, theta: np.ndarray) -> np.ndarray:
    """Relative errors (predicted / measured - 1) of every measured TTFT and TPOT, point by point."""
    spec, host = card(base, theta)
    out = []
    for p in points:
        ttft, tpot = predict(p, spec, host)
        out += [ttft / p.ttft_s - 1] if p.ttft_s else []
        out += [tpot / p.tpot_s - 1] if p.tpot_s else []
    return np.array(out)


def fit(points: list[Point], base, *, fit_host: bool = False, iters: int = 40, tol: float = 1e-7):
    """Levenberg-Marquardt on the fitted points; (parameters, sum of squares)."""
    n = 4 if fit_host else 3
    scale, low, high = SCALE[:n], LOW[:n], HIGH[:n]
    x = np.array([base.compute_efficiency, base.memory_efficiency, base.op_overhead_ns, 0.0][:n]) / scale
    used = [p for p in points if p.fit]

    def f(x):
        return residuals(used, base, np.clip(x * scale, low, high))

    r, lam = f(x), 1e-2
    cost = float(r @ r)
    for _ in range(iters):
        J = np.empty((r.size, n))
        for j in range(n):
            h = 1e-3 * max(abs(x[j]), 1e-2)
            dx = x.copy()
            dx[j] += h
            J[:, j] = (f(dx) - r) / h
        A, g = J.T @ J, J.T @ r
        while True:
            step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
            trial = np.clip((x + step) * scale, low, high) / scale
            rt = f(trial)
            ct = float(rt @ rt)
            if ct < cost:
                done = cost - ct < tol * max(cost, 1e-12)
                x, r, cost, lam = trial, rt, ct, lam / 3
                break
            lam *= 4
            if lam > 1e8:
                return np.clip(x * scale, low, high), cost
        if done:
            break
    return np.clip(x * scale, low, high), cost


def write_card(path: str, base, theta: np.ndarray) -> None:
    lines = [f'name = "{base.name}-calibrated"', f'base = "{base.name}"',
             f"compute_efficiency = {theta[0]:.6f}", f"memory_efficiency = {theta[1]:.6f}",
             f"op_overhead_ns = {int(round(theta[2]))}"]
    if len(theta) > 3:
        lines += ["", "[extra]", f"host_step_ns = {int(round(theta[3]))}"]
    with open(path, "w") as f:
        f.write("# fitted by rsd-launch calibrate\n" + "\n".join(lines) + "\n")


def _args(p):
    p.add_argument("--measurements", required=True, metavar="FILE.csv",
                   help=f"measured points: {','.join(FIELDS)}[,use] (use: fit or check)")
    p.add_argument("--out", metavar="CARD.toml", help="write the fitted card here (none: print only)")
    p.add_argument("--fit-host", action="store_true", help="fit a host cost per step too")
    p.add_argument("--iters", type=int, default=40, help="Levenberg-Marquardt iterations at most")


@command("calibrate", "fit a device's efficiency factors, op overhead and host cost to measured TTFT / TPOT",
         _args, shared=("device",))
def cmd_calibrate(args) -> int:
    from devices.spec import PRESETS, get_spec

    if args.device.endswith(".toml"):
        raise ValueError(f"--device {args.device}: calibrate starts from a preset ({', '.join(PRESETS)})")
    base = get_spec(args.device)
    points = read_points(args.measurements)
    theta, cost = fit(points, base, fit_host=args.fit_host, iters=args.iters)
    spec, host = card(base, theta)
    print(f"# {base.name} fitted on {sum(p.fit for p in points)} of {len(points)} points [emulated clock]")
    for name, v in zip(NAMES, theta):
        print(f"{name:>20} = {v:.6g}")
    print(f"{'point':>5} {'use':>5} {'model':>12} {'tp':>3} {'batch':>5} {'in':>6} {'out':>6} "
          f"{'TTFT err %':>10} {'TPOT err %':>10}")
    for i, p in enumerate(points):
        ttft, tpot = predict(p, spec, host)
        e1 = f"{(ttft / p.ttft_s - 1) * 100:>10.2f}" if p.ttft_s else f"{'-':>10}"
        e2 = f"{(tpot / p.tpot_s - 1) * 100:>10.2f}" if p.tpot_s else f"{'-':>10}"
        print(f"{i:>5} {'fit' if p.fit else 'check':>5} {p.model[-12:]:>12} {p.tp:>3} {p.batch:>5} "
              f"{p.input_len:>6} {p.output_len:>6} {e1} {e2}")
    if args.out:
        write_card(args.out, base, theta)
        print(f"# wrote {args.out} (use it as --device {args.out})", file=sys.stderr)
    return 0


COMMAND = COMMANDS["calibrate"]
