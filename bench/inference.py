"""Inference benchmark on the emulated clock: how fast would this model run on N cards?

    python -m bench.inference --model llama3-8b --device atom-plus --tp 4 --instances 4 \\
        --input-len 2048 --output-len 2048 --sweep-batch --json out.json [--plot scaling.png]

Phantom cards run the model's real command streams (shapes, collectives,
memory limits) without weights or math; every figure is read off the emulated
clock and repeats exactly. By default the instances run in this process
(``--backend sim``), with the same emulated figures as phantom card
processes (``--backend cards``) and a fraction of the wall time.

A static batch per instance: all prompts arrive at clock 0 and are prefilled
in chunks of ``--chunk`` tokens, then decode together. For each batch size:
TTFT, TPOT (= decode time / (output tokens - 1)), output tokens/s over all
instances, TPS per watt (card TDP x cards + ``--server-watts`` per server of
``--cards-per-server``) and, with ``--card-price``, TPS per dollar.
``--sweep-batch`` doubles the batch up to what the KV cache holds. The
scaling table runs 1, 2, 4, 8 (and ``--instances``) instances together, each
at the best batch, on one fabric: every row is measured. For a rack under a
request stream, see ``bench.serve --replay``.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import TYPE_CHECKING

from bench.common import entry, write_json
from devices.memory import OutOfDeviceMemory
from devices.spec import get_spec
from interconnect.topology import topology_names
from rsd_runtime.cli import DefaultsFormatter, add_compiler_args

if TYPE_CHECKING:  # rsd_runtime.perf, and torch with it, loads once the flags are checked
    from rsd_runtime.perf import BatchTiming, PerfRunner


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--phantom", action="store_true",
                   help="accepted for clarity: the cards are always phantom (weights of these sizes do not fit "
                        "this host)")
    p.add_argument("--model", default="llama3-8b", help="preset (llama3-8b, llama3-70b, llama3.1-405b, ...) or a "
                                                        "directory with a config.json")
    p.add_argument("--device", default="atom-plus", help="device preset or a .toml card file")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--instances", type=int, default=1, help="tensor-parallel instances, stepped together")
    p.add_argument("--topology", default="switch", help=f"preset ({', '.join(topology_names())}) or a .toml file")
    p.add_argument("--link", help="the cards' own link (default: the topology's)")
    p.add_argument("--placement", metavar="CARDS",
                   help="cards of each instance, instances split by |, as '0 4|1 5' (default: consecutive cards, "
                        "box by box: instance i on cards i*tp .. i*tp+tp-1)")
    p.add_argument("--backend", choices=["sim", "cards"], default="sim",
                   help="sim: instances in this process; cards: phantom card processes (same figures, slower)")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1], help="per instance")
    p.add_argument("--sweep-batch", action="store_true", help="1, 2, 4, ... up to what the KV cache holds")
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step (chunked prefill)")
    p.add_argument("--decode-samples", type=int, default=5,
                   help="decode steps run at this many context lengths and interpolated between (0: run all)")
    p.add_argument("--dtype", help="compute/KV dtype (default: the model's)")
    p.add_argument("--cards-per-server", type=int, default=8)
    p.add_argument("--server-watts", type=float, default=0.0, help="host power per server (CPU, fans, NICs)")
    p.add_argument("--card-price", type=float, help="USD per card, for TPS per dollar")
    p.add_argument("--scaling-tp", type=int, nargs="*", help="tp values for the scaling table (default: --tp)")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    add_compiler_args(p)
    p.add_argument("--breakdown", action="store_true",
                   help="print where a prefill and a decode step's time goes (first batch size)")
    p.add_argument("--trace", metavar="FILE.json",
                   help="write a Chrome/Perfetto trace of instance 0's steps (emulated clock)")
    p.add_argument("--json", metavar="PATH", help="write the records here")
    p.add_argument("--plot", metavar="PNG", help="draw TPS and TPOT against batch, and TPS against cards")
    p.add_argument("--shm-prefix", default="rsdbench", help="prefix of segments (--backend cards)")
    args = p.parse_args(argv)
    for name in ("tp", "instances", "input_len", "output_len", "chunk", "cards_per_server"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch_size):
        p.error("--batch-size values must be >= 1")
    if args.placement is not None:
        from rsd_runtime.perf import placement_of

        try:
            args.placement = [[int(c) for c in part.split()] for part in args.placement.split("|")]
            placement_of(args.tp, args.instances, args.placement)
        except ValueError as exc:
            p.error(f"--placement: {exc}" if "placement" not in str(exc) else f"--{exc}")
    return args


def runner(args, tp: int, instances: int) -> PerfRunner:
    """``instances`` of ``tp`` cards: on the first groups of --placement at its tp, else consecutive cards."""
    from rsd_runtime.perf import PerfRunner

    kw = {"shm_prefix": args.shm_prefix} if args.backend == "cards" else {}
    placement = args.placement[:instances] if args.placement and tp == args.tp else None
    return PerfRunner(args.model, tp=tp, instances=instances, device=args.device, dtype=args.dtype,
                      backend=args.backend, topology=args.topology, link=args.link, placement=placement,
                      fusion=args.fusion, overlap=args.overlap, host_overhead=args.host_overhead, **kw)


def power_w(args, spec, cards: int) -> float:
    return cards * spec.tdp_watts + math.ceil(cards / args.cards_per_server) * args.server_watts


def record(args, spec, r: PerfRunner, bt: BatchTiming) -> dict:
    cards = r.tp * r.instances
    tps = bt.tps(r.instances)
    watts = power_w(args, spec, cards)
    return {"model": args.model, "device": spec.name, "topology": args.topology, "tp": r.tp,
            "instances": r.instances, "placement": r.placement, "cards": cards, "batch": bt.batch,
            "input_len": args.input_len,
            "output_len": args.output_len, "emu_ttft_s": bt.ttft_ns * 1e-9, "emu_tpot_s": bt.tpot_ns * 1e-9,
            "emu_total_s": bt.total_ns * 1e-9, "emu_tps": tps, "emu_tps_per_card": tps / cards, "watts": watts,
            "emu_tps_per_watt": tps / watts,
            "emu_tps_per_dollar": tps / (cards * args.card_price) if args.card_price else None,
            "fusion": args.fusion, "overlap": args.overlap, "host_overhead": args.host_overhead, "clock": "emulated"}


def batches(args, r: PerfRunner) -> tuple[list[int], int]:
    """The batch sizes to run, and the most sequences of input + output tokens the KV cache holds."""
    fit = r.num_kv_blocks // -(-(args.input_len + args.output_len) // r.block_size)
    if not args.sweep_batch:
        return args.batch_size, fit
    out, b = [], 1
    while b <= fit:
        out.append(b)
        b *= 2
    if fit and out[-1] != fit:
        out.append(fit)
    return out, fit


def timing(args, r: PerfRunner, b: int) -> BatchTiming:
    from rsd_runtime.perf import batch_timing

    return batch_timing(r, b, args.input_len, args.output_len, chunk=args.chunk, decode_samples=args.decode_samples)


def print_header(args, spec, r: PerfRunner, fit: int) -> None:
    print(f"# {args.model} on {args.tp} x {args.instances} {spec.name} cards (tp x instances), phantom, "
          f"{args.topology} topology; input {args.input_len}, output {args.output_len} tokens; fusion {args.fusion}, "
          f"overlap {args.overlap}, host overhead {args.host_overhead}")
    print(f"# cards of each instance: {' | '.join(' '.join(map(str, g)) for g in r.placement)}")
    print(f"# KV cache: {r.kv_tokens()} tokens per instance, so at most {fit} sequences of "
          f"{args.input_len + args.output_len} tokens per instance: the sweep stops there")
    price = f" {'TPS/$':>9}" if args.card_price else ""
    print(f"{'batch':>6} {'TTFT (s)':>10} {'TPOT (ms)':>10} {'TPS':>10} {'TPS/card':>9} {'TPS/W':>8}{price}"
          f"   [emulated clock; batch per instance]")


def print_row(rec: dict, args) -> None:
    price = f" {rec['emu_tps_per_dollar']:>9.4f}" if args.card_price else ""
    print(f"{rec['batch']:>6} {rec['emu_ttft_s']:>10.3f} {rec['emu_tpot_s'] * 1e3:>10.2f} {rec['emu_tps']:>10.1f} "
          f"{rec['emu_tps_per_card']:>9.1f} {rec['emu_tps_per_watt']:>8.3f}{price}", flush=True)


def scaling(args, spec, best_by_tp: dict[int, dict]) -> list[dict]:
    """Every row measured: k instances stepped together on one fabric, each at its tp's best batch."""
    rows = []
    print("\n# scaling at each tp's best batch, k instances run together [emulated clock]")
    print(f"{'cards':>6} {'tp':>4} {'inst':>5} {'batch':>6} {'TPS':>10} {'TPS/card':>9} {'TPS/W':>8}")
    for tp, best in sorted(best_by_tp.items()):
        # a placement names at most --instances groups: no more are run at its tp
        for k in sorted(k for k in {1, 2, 4, 8, args.instances} if not args.placement or tp != args.tp
                        or k <= args.instances):
            with runner(args, tp, k) as r:
                rec = record(args, spec, r, timing(args, r, best["batch"]))
            rows.append(rec)
            print(f"{rec['cards']:>6} {tp:>4} {k:>5} {rec['batch']:>6} {rec['emu_tps']:>10.1f} "
                  f"{rec['emu_tps_per_card']:>9.1f} {rec['emu_tps_per_watt']:>8.3f}", flush=True)
    return rows


def breakdown(args, r: PerfRunner, batch: int) -> dict:
    """Print and return where a prefill step (the first of the batch) and a decode step go."""
    from rsd_runtime.breakdown import step_breakdown
    from rsd_runtime.perf import _prefill_steps

    steps = {"prefill": [(n, p0) for _, n, p0 in _prefill_steps(batch, args.input_len, args.chunk)[0]],
             "decode": [(1, args.input_len)] * batch}
    got = {k: step_breakdown(r.engines[0], seqs, r.host) for k, seqs in steps.items()}
    print(f"\n# where a step's time goes, card 0, batch {batch} [emulated clock, us]")
    print(f"{'':>22} {'prefill':>12} {'decode':>12}")
    names = list(dict.fromkeys(n for b in got.values() for n, _ in b.rows()))
    out = {k: dict(b.rows()) | {"step": b.step_ns, "chunks": b.chunks} for k, b in got.items()}
    for name in names + ["step"]:
        print(f"{name:>22} " + " ".join(f"{out[k].get(name, 0) / 1e3:>12.1f}" for k in steps))
    print(f"{'chunks':>22} " + " ".join(f"{out[k]['chunks']:>12}" for k in steps))
    return out


def plot(path: str, rows: list[dict], scale: list[dict], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    panels = (2 if len(rows) > 1 else 0) + (1 if scale else 0)
    if not panels:
        raise ValueError("--plot needs a batch sweep (--sweep-batch or several --batch-size) or the scaling table")
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), dpi=120, squeeze=False)
    axes = list(axes[0])
    if len(rows) > 1:
        b = [r["batch"] for r in rows]
        ax = axes.pop(0)
        ax.plot(b, [r["emu_tps"] for r in rows], marker="o")
        ax.set(xscale="log", xlabel="batch per instance", ylabel="output tokens/s", title="throughput")
        ax = axes.pop(0)
        ax.plot(b, [r["emu_tpot_s"] * 1e3 for r in rows], marker="o", color="tab:orange")
        ax.set(xscale="log", xlabel="batch per instance", ylabel="TPOT (ms)", title="time per output token")
    if scale:
        ax = axes.pop(0)
        for tp in sorted({r["tp"] for r in scale}):
            pts = sorted((r["cards"], r["emu_tps"]) for r in scale if r["tp"] == tp)
            ax.plot([c for c, _ in pts], [t for _, t in pts], marker="o", label=f"tp={tp} (measured)")
        ax.set(xlabel="cards", ylabel="output tokens/s", title="scaling over instances")
        ax.legend()
    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{args.model} on {args.device} ({args.topology}), in {args.input_len} / out {args.output_len}, "
                 f"emulated clock", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    print(f"# wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = get_spec(args.device)
    t0 = time.perf_counter()
    rows, split, trace = [], None, None
    with runner(args, args.tp, args.instances) as r:
        if args.trace:
            from rsd_runtime.trace import Trace

            trace = Trace()
            r.start_trace(trace)
        sizes, fit = batches(args, r)
        if fit < 1:
            raise OutOfDeviceMemory(f"card 0: the KV cache ({r.kv_tokens()} tokens) cannot hold one sequence "
                                    f"of {args.input_len + args.output_len} tokens")
        print_header(args, spec, r, fit)
        for b in sizes:
            rows.append(record(args, spec, r, timing(args, r, b)))
            print_row(rows[-1], args)
        if args.breakdown:
            split = breakdown(args, r, sizes[0])
    if trace is not None:
        trace.write(args.trace)
        print(f"# wrote the trace to {args.trace} (emulated clock; instance 0)")
    best = max(rows, key=lambda x: x["emu_tps"])
    print(f"# max TPS at best batch: {best['emu_tps']:.1f} tokens/s at batch {best['batch']} per instance "
          f"({best['emu_tps_per_watt']:.3f} TPS/W)")
    scale = []
    if not args.no_scaling:
        best_by_tp = {args.tp: best}
        for tp in args.scaling_tp or []:
            if tp == args.tp:
                continue
            try:
                with runner(args, tp, 1) as r:
                    sizes, _ = batches(args, r)
                    best_by_tp[tp] = max((record(args, spec, r, timing(args, r, b)) for b in sizes),
                                         key=lambda x: x["emu_tps"])
            except (OutOfDeviceMemory, ValueError) as exc:
                print(f"# tp={tp} skipped: {exc}")
        scale = scaling(args, spec, best_by_tp)
    wall = time.perf_counter() - t0
    print(f"# wall time {wall:.1f} s")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        config["batch_size"] = [x["batch"] for x in rows]  # as run (a sweep chooses them)
        write_json(args.json, "inference", config, rows, best=best, scaling=scale, device=spec.to_dict(),
                   breakdown=split, wall_s=wall)
        print(f"# wrote {args.json}")
    if args.plot:
        plot(args.plot, rows, scale, args)
    return 0


if __name__ == "__main__":
    entry(main, "python -m bench.inference")
