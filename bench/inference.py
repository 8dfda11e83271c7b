"""Inference benchmark on the emulated clock: how fast would this model run on N cards?

    python -m bench.inference --phantom --model llama3-8b --device atom-plus --tp 4 --instances 4 \\
        --input-len 2048 --output-len 2048 --sweep-batch --json out.json [--plot scaling.png]

Phantom cards run the model's real command streams (shapes, collectives,
memory limits) without weights or math; every figure is read off the emulated
clock and repeats exactly. For each batch size (per instance): TTFT, TPOT
(= decode time / (output tokens - 1)), output tokens/s over all instances, TPS
per watt (card TDP x cards + --server-watts per server of --cards-per-server)
and, with --card-price, TPS per dollar of hardware. --sweep-batch doubles the
batch until the KV cache is full and reports the best ("max TPS at best
batch"). The scaling table runs each --scaling-tp at its best batch on one
instance; instances are independent tensor-parallel groups on separate card
ports, so N instances give N times one instance's TPS (the main row runs all
of them at once).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from bench.common import write_json
from devices.memory import OutOfDeviceMemory
from devices.spec import get_spec
from rsd_runtime.perf import BatchTiming, PerfRunner, batch_timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--phantom", action="store_true", default=True,
                   help="phantom cards (the only mode: real weights of these sizes do not fit this host)")
    p.add_argument("--model", default="llama3-8b", help="preset (llama3-8b, llama3-70b, llama3.1-405b) or a "
                                                        "directory with a config.json")
    p.add_argument("--device", default="atom-plus", help="device preset or a .toml card file")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--instances", type=int, default=1, help="independent tensor-parallel groups")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1], help="per instance")
    p.add_argument("--sweep-batch", action="store_true", help="1, 2, 4, ... up to what the KV cache holds")
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step (chunked prefill)")
    p.add_argument("--decode-samples", type=int, default=5, help="decode steps run (0: all), interpolated between")
    p.add_argument("--dtype", help="compute/KV dtype (default: the model's)")
    p.add_argument("--cards-per-server", type=int, default=8)
    p.add_argument("--server-watts", type=float, default=0.0, help="host power per server (CPU, fans, NICs)")
    p.add_argument("--card-price", type=float, help="USD per card, for TPS per dollar")
    p.add_argument("--scaling-tp", type=int, nargs="*", help="tp values for the scaling table (default: --tp)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="draw the scaling curve")
    p.add_argument("--shm-prefix", default="rsdbench")
    return p.parse_args(argv)


def power_w(args, spec, cards: int) -> float:
    return cards * spec.tdp_watts + math.ceil(cards / args.cards_per_server) * args.server_watts


def record(args, spec, runner: PerfRunner, bt: BatchTiming, instances: int) -> dict:
    cards = runner.tp * instances
    tps = bt.tps(instances)
    watts = power_w(args, spec, cards)
    return {"model": args.model, "device": spec.name, "tp": runner.tp, "instances": instances, "cards": cards,
            "batch": bt.batch, "input_len": args.input_len, "output_len": args.output_len,
            "emu_ttft_s": bt.ttft_ns * 1e-9, "emu_tpot_s": bt.tpot_ns * 1e-9, "emu_total_s": bt.total_ns * 1e-9,
            "emu_tps": tps, "emu_tps_per_card": tps / cards, "watts": watts, "emu_tps_per_watt": tps / watts,
            "emu_tps_per_dollar": tps / (cards * args.card_price) if args.card_price else None,
            "clock": "emulated"}


def batches(args, runner: PerfRunner) -> list[int]:
    if not args.sweep_batch:
        return args.batch_size
    fit = runner.num_kv_blocks // -(-(args.input_len + args.output_len) // runner.block_size)
    out, b = [], 1
    while b <= fit:
        out.append(b)
        b *= 2
    if fit and out[-1] != fit:
        out.append(fit)
    return out


def run_config(args, spec, tp: int, instances: int, show: bool) -> list[dict]:
    rows = []
    with PerfRunner(args.model, tp=tp, instances=instances, device=args.device, dtype=args.dtype,
                    shm_prefix=args.shm_prefix) as runner:
        sizes = batches(args, runner)
        if not sizes:
            raise OutOfDeviceMemory(f"card 0: the KV cache ({runner.kv_tokens()} tokens) cannot hold one sequence "
                                    f"of {args.input_len + args.output_len} tokens")
        for b in sizes:
            bt = batch_timing(runner, b, args.input_len, args.output_len, chunk=args.chunk,
                              decode_samples=args.decode_samples)
            rows.append(record(args, spec, runner, bt, instances))
            if show:
                print_row(rows[-1], args)
    return rows


def print_header(args, spec, kv_note: str) -> None:
    print(f"# {args.model} on {args.tp} x {args.instances} {spec.name} cards (tp x instances), phantom; "
          f"input {args.input_len}, output {args.output_len} tokens; {kv_note}")
    price = f" {'TPS/$':>9}" if args.card_price else ""
    print(f"{'batch':>6} {'TTFT (s)':>10} {'TPOT (ms)':>10} {'TPS':>10} {'TPS/card':>9} {'TPS/W':>8}{price}"
          f"   [emulated clock; batch per instance]")


def print_row(r: dict, args) -> None:
    price = f" {r['emu_tps_per_dollar']:>9.4f}" if args.card_price else ""
    print(f"{r['batch']:>6} {r['emu_ttft_s']:>10.3f} {r['emu_tpot_s'] * 1e3:>10.2f} {r['emu_tps']:>10.1f} "
          f"{r['emu_tps_per_card']:>9.1f} {r['emu_tps_per_watt']:>8.3f}{price}", flush=True)


def scaling(args, spec, best_by_tp: dict[int, dict]) -> list[dict]:
    rows = []
    for tp, best in sorted(best_by_tp.items()):
        per_instance = best["emu_tps"] / best["instances"]
        for inst in sorted({1, 2, 4, 8, args.instances}):
            cards = tp * inst
            tps = per_instance * inst
            rows.append({"tp": tp, "instances": inst, "cards": cards, "batch": best["batch"], "emu_tps": tps,
                         "emu_tps_per_card": tps / cards, "emu_tps_per_watt": tps / power_w(args, spec, cards),
                         "measured": inst == best["instances"]})
    print("\n# scaling at each tp's best batch [emulated clock]")
    print(f"{'cards':>6} {'tp':>4} {'inst':>5} {'batch':>6} {'TPS':>10} {'TPS/card':>9} {'TPS/W':>8}  run")
    for r in rows:
        print(f"{r['cards']:>6} {r['tp']:>4} {r['instances']:>5} {r['batch']:>6} {r['emu_tps']:>10.1f} "
              f"{r['emu_tps_per_card']:>9.1f} {r['emu_tps_per_watt']:>8.3f}  {'measured' if r['measured'] else 'x inst'}")
    return rows


def plot(path: str, rows: list[dict], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for tp in sorted({r["tp"] for r in rows}):
        pts = sorted((r["cards"], r["emu_tps"]) for r in rows if r["tp"] == tp)
        ax.plot([c for c, _ in pts], [t for _, t in pts], marker="o", label=f"tp={tp}")
    ax.set_xlabel("cards")
    ax.set_ylabel("output tokens/s (emulated)")
    ax.set_title(f"{args.model} on {args.device}, in {args.input_len} / out {args.output_len}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"# wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = get_spec(args.device)
    t0 = time.perf_counter()
    try:
        with PerfRunner(args.model, tp=args.tp, instances=1, device=args.device, dtype=args.dtype,
                        shm_prefix=args.shm_prefix) as probe:
            kv_note = f"KV cache {probe.kv_tokens()} tokens per instance"
        print_header(args, spec, kv_note)
        rows = run_config(args, spec, args.tp, args.instances, show=True)
        best = max(rows, key=lambda r: r["emu_tps"])
        print(f"# max TPS at best batch: {best['emu_tps']:.1f} tokens/s at batch {best['batch']} per instance "
              f"({best['emu_tps_per_watt']:.3f} TPS/W)")
        best_by_tp = {args.tp: best}
        for tp in args.scaling_tp or []:
            if tp != args.tp:
                try:
                    best_by_tp[tp] = max(run_config(args, spec, tp, 1, show=False), key=lambda r: r["emu_tps"])
                except (OutOfDeviceMemory, ValueError) as exc:
                    print(f"# tp={tp} skipped: {exc}")
        scale = scaling(args, spec, best_by_tp)
    except (OutOfDeviceMemory, ValueError) as exc:
        print(f"bench.inference: error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    print(f"# wall time {wall:.1f} s")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        config["batch_size"] = [r["batch"] for r in rows]  # as run (a sweep chooses them)
        write_json(args.json, "inference", config, rows,
                   best=best, scaling=scale, device=spec.to_dict(), wall_s=wall)
        print(f"# wrote {args.json}")
    if args.plot:
        plot(args.plot, scale, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
