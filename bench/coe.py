"""Composition of Experts on the emulated clock: switch times and machine footprint.

    python -m bench.coe --switching --model llama2-7b --json coe.json --plot coe.png
    python -m bench.coe --footprint --num-experts 150 --model llama2-7b
    python -m bench.coe --replay --device sn40l --num-experts 150 --model llama2-7b --num-prompts 200 --seed 0

``--switching``: emulated time to make one expert active on a node, i.e. to
copy every card's shard into device memory: from each socket's DDR tier on an
SN40L-class node, from host DRAM over PCIe Gen5 on a DGX-H100-class node (each
GPU on its own x16 path to the root complex) and on an ATOM+ server (cards
under one PCIe switch, sharing its uplink). ``--plot`` draws switch time
against expert size for each node.

``--footprint``: cards (or sockets) needed to hold E experts, with the experts
kept in a DDR tier and without one (every expert resident in device memory).

``--replay``: a request mix over E experts with Zipf popularity served by one
node on the emulated clock, against the same mix on that node without a DDR
tier (``bench.coe_replay``).
"""
from __future__ import annotations

import argparse
import math
import time

from bench import coe_replay
from bench.common import pyplot, write_json
from devices.memory import fmt_bytes
from devices.spec import get_spec
from rsd_runtime.coe import switch_path
from rsd_runtime.deploy import shard_bytes
from rsd_runtime.model_config import get_model_preset

# (label, device preset, topology for host copies); every node holds 8 cards or sockets.
NODES = [
    # SambaNova SN40L node: 8 sockets, each with its own DDR (MICRO 2024 paper, arXiv:2405.07518).
    ("sn40l-node", "sn40l", None),
    # NVIDIA DGX H100 user guide: each of the 8 GPUs reaches the CPUs through its own ConnectX-7
    # PCIe Gen5 bridge, so no two GPUs share a host link (the host-staged preset's layout).
    ("dgx-h100", "gpu-h100", "host-staged"),
    # An ATOM+ server as this project's cluster builds it by default: 8 cards under one PCIe switch.
    ("atom-plus-server", "atom-plus", "switch"),
]
UTILIZATION = 0.9  # share of device memory for weights and KV (vLLM's gpu_memory_utilization default)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.coe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--switching", action="store_true", help="time to switch one expert, per node")
    what.add_argument("--footprint", action="store_true", help="cards needed to hold --num-experts experts")
    what.add_argument("--replay", action="store_true", help="a request mix over --num-experts experts, replayed")
    p.add_argument("--model", default="llama2-7b", help="model shape preset of every expert")
    p.add_argument("--num-cards", type=int, default=8, help="cards (sockets) per node; experts use them all")
    p.add_argument("--num-experts", type=int, default=150, help="experts to hold (--footprint)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "int8"],
                   help="weight dtype")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    p.add_argument("--plot", metavar="PNG", help="--switching: switch time against expert size per node; "
                                                 "--replay: switching time and TTFT per node")
    coe_replay.add_args(p)
    args = p.parse_args(argv)
    if args.num_cards < 1 or args.num_experts < 1:
        p.error("--num-cards and --num-experts must be >= 1")
    coe_replay.check_args(p, args)
    return args


def _itemsize(dtype: str) -> int:
    from interconnect import wire

    return wire.itemsize(dtype)


def switching(model: str, num_cards: int, dtype: str) -> list[dict]:
    cfg = get_model_preset(model)
    nbytes = shard_bytes(cfg, num_cards, _itemsize(dtype))
    records = []
    for label, device, topology in NODES:
        spec = get_spec(device)
        path = switch_path(spec, num_cards=num_cards, topology=topology or "switch")
        records.append({"device": label, "model": model, "num_cards": num_cards, "bytes": nbytes,
                        "emu_switch_s": path.copy_ns(nbytes) / 1e9, "path": path.describe()})
    return records


def footprint(model: str, num_experts: int, dtype: str) -> list[dict]:
    """Cards needed: each expert is sharded over the fewest cards (a power of two) its shard fits on;
    with a DDR tier the cards must also hold every expert in DDR, without one in device memory."""
    cfg = get_model_preset(model)
    size = _itemsize(dtype)
    total = shard_bytes(cfg, 1, size)
    records = []
    for label, device, _ in NODES:
        spec = get_spec(device)
        room = int(spec.memory_bytes * UTILIZATION)
        tp = 1
        while shard_bytes(cfg, tp, size) > room:
            tp *= 2
            if tp > 1024:
                raise ValueError(f"{model} does not fit on 1024 cards of {device}")
        options = [("device memory", room)] + ([("ddr", spec.ddr_bytes)] if spec.ddr_bytes else [])
        for tier, per_card in options:
            cards = max(tp, math.ceil(num_experts * total / per_card))
            cards = math.ceil(cards / tp) * tp
            records.append({"device": label, "model": model, "num_experts": num_experts, "tier": tier,
                            "expert_bytes": total, "tp": tp, "num_cards": cards, "nodes": math.ceil(cards / 8)})
    return records


def plot(path: str, num_cards: int, dtype: str) -> None:
    plt = pyplot()
    sizes = [1 << k for k in range(30, 40)]  # whole-expert bytes, 1 GiB .. 512 GiB
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, device, topology in NODES:
        p = switch_path(get_spec(device), num_cards=num_cards, topology=topology or "switch")
        ax.loglog([s / (1 << 30) for s in sizes], [p.copy_ns(s // num_cards) / 1e9 for s in sizes], marker="o",
                  label=label)
    ax.set_xlabel("expert size (GiB, all cards)")
    ax.set_ylabel("switch time (s, emulated)")
    ax.set_title(f"expert switch on {num_cards} cards")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.switching:
        records = switching(args.model, args.num_cards, args.dtype)
        print(f"# expert switch, {args.model} in {args.dtype} on {args.num_cards} cards per node (emulated clock)")
        print(f"{'device':>17} {'bytes/card':>12} {'switch ms':>10} {'vs best':>8}  path")
        best = min(r["emu_switch_s"] for r in records)
        for r in records:
            print(f"{r['device']:>17} {fmt_bytes(r['bytes']):>12} {r['emu_switch_s'] * 1e3:>10.2f} "
                  f"{r['emu_switch_s'] / best:>7.1f}x  {r['path']}")
        if args.plot:
            plot(args.plot, args.num_cards, args.dtype)
            print(f"# wrote {args.plot}")
    elif args.replay:
        t0 = time.perf_counter()
        records = coe_replay.replay(args)
        coe_replay.print_table(records, args)
        print(f"# wall time {time.perf_counter() - t0:.1f} s (the figures above are on the emulated clock)")
        if args.plot:
            coe_replay.plot(args.plot, records)
            print(f"# wrote {args.plot}")
    else:
        if args.plot:
            raise ValueError("--plot draws the --switching and --replay figures")
        records = footprint(args.model, args.num_experts, args.dtype)
        print(f"# footprint of {args.num_experts} x {args.model} experts in {args.dtype}")
        print(f"{'device':>17} {'experts held in':>16} {'tp':>4} {'cards':>6} {'nodes of 8':>10}")
        for r in records:
            print(f"{r['device']:>17} {r['tier']:>16} {r['tp']:>4} {r['num_cards']:>6} {r['nodes']:>10}")
    if args.json:
        write_json(args.json, "coe", {k: v for k, v in vars(args).items() if k != "json"}, records)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.coe")
