"""A Composition of Experts under a request mix, replayed on the emulated clock (``python -m bench.coe --replay``).

Requests arrive as vLLM's benchmark draws them (Poisson at ``--request-rate``)
and each names one of E experts, drawn with Zipf popularity (expert i with
weight 1 / (i + 1) ** s). One instance of ``--num-cards`` phantom cards serves
them all (``rsd_runtime.coe_engine``, in this process: the sim backend), driven
by the rack's replay loop (``rsd_runtime.replay``). The same mix runs twice: on
the device as given (experts staged in its DDR tier, if it has one) and on the
same device without a DDR tier (experts staged in host memory, copied over
the PCIe tree of ``--topology``).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from bench.rack import results_of
from bench.serve_metrics import summarize
from bench.workload import arrival_times, synthetic_prompts


def add_args(p) -> None:
    g = p.add_argument_group("--replay: a request mix over the experts, on the emulated clock")
    g.add_argument("--device", default="sn40l", help="device preset or a .toml card file")
    g.add_argument("--num-prompts", type=int, default=200, help="requests in the mix")
    g.add_argument("--request-rate", type=float, default=4.0, help="requests per second (Poisson arrivals)")
    g.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity")
    g.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    g.add_argument("--output-len", type=int, default=64, help="output tokens")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences per step")
    g.add_argument("--topology", default="switch", help="PCIe layout for host-memory staging: a preset or .toml")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals, prompts and expert choices")


def check_args(p, args) -> None:
    if args.num_prompts < 1 or not args.request_rate > 0 or args.zipf < 0:
        p.error("--num-prompts must be >= 1, --request-rate > 0 and --zipf >= 0")


def mix(args, vocab_size: int) -> list:
    """(arrival s, prompt ids, output tokens, expert) per request; the same for the same seed."""
    from rsd_runtime.replay import ReplayRequest

    prompts = synthetic_prompts(args.num_prompts, args.input_len, args.output_len, vocab_size, args.seed)
    times = arrival_times(args.num_prompts, args.request_rate, 1.0, args.seed)
    weights = 1.0 / np.arange(1, args.num_experts + 1) ** args.zipf
    rng = np.random.default_rng(args.seed + 1)
    experts = rng.choice(args.num_experts, size=args.num_prompts, p=weights / weights.sum())
    return [ReplayRequest(round(t * 1e9), p.prompt, p.output_len, model=f"e{int(e)}")
            for t, p, e in zip(times, prompts, experts)]


def replay_one(args, spec, staging: str | None, requests) -> dict:
    from rsd_runtime.coe_engine import CoEEngine
    from rsd_runtime.replay import Replay
    from rsd_runtime.routing import get_policy

    engine = CoEEngine({f"e{i}": args.model for i in range(args.num_experts)}, args.num_cards, device=spec,
                       staging=staging, phantom=True, backend="sim", topology=args.topology,
                       max_num_seqs=args.max_num_seqs, progress=False)
    t0 = time.perf_counter()
    records = Replay([engine], get_policy("round-robin")).run(requests)
    wall = time.perf_counter() - t0
    end_ns = max(r.end_ns or 0 for r in records)
    out = summarize(results_of(records), end_ns * 1e-9)
    sw = engine.switch_stats()
    out.update({"clock": "emulated", "device": spec.name, "staging": engine.pool.path.source,
                "path": engine.pool.path.describe(), "num_experts": args.num_experts, "model": args.model,
                "num_cards": args.num_cards, **sw, "hit_rate": sw["hits"] / max(1, sw["hits"] + sw["switches"]),
                "expert_bytes": engine.pool.experts["e0"],
                "resident_max": len(engine.pool.resident), "wall_s": wall})
    return out


def replay(args) -> list[dict]:
    from devices.spec import get_spec
    from rsd_runtime.model_config import get_model_preset

    spec = get_spec(args.device)
    requests = mix(args, get_model_preset(args.model).vocab_size)
    runs = [replay_one(args, spec, None, requests)]
    if spec.ddr_bytes:  # the same node without its DDR tier: experts wait in host memory
        bare = dataclasses.replace(spec, name=f"{spec.name}-no-ddr", ddr_bytes=0, ddr_bw=0.0)
        runs.append(replay_one(args, bare, "host", requests))
    return runs


def print_table(runs: list[dict], args) -> None:
    print(f"# {args.num_prompts} requests at {args.request_rate:g} req/s over {args.num_experts} x {args.model} "
          f"(Zipf {args.zipf:g}), {args.input_len} in / {args.output_len} out, {args.num_cards} cards, "
          f"seed {args.seed} (emulated clock)")
    print(f"{'node':>20} {'switches':>8} {'hit rate':>8} {'switching s':>11} {'mean TTFT ms':>12} "
          f"{'p99 TTFT ms':>11} {'out tok/s':>9}  staging path")
    for r in runs:
        print(f"{r['device']:>20} {r['switches']:>8} {r['hit_rate']:>8.1%} {r['emu_switch_s']:>11.3f} "
              f"{r['mean_ttft_ms']:>12.1f} {r['p99_ttft_ms']:>11.1f} {r['output_throughput']:>9.1f}  {r['path']}")


def plot(path: str, runs: list[dict]) -> None:
    from bench.common import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    names = [r["device"] for r in runs]
    axes[0].bar(names, [r["emu_switch_s"] for r in runs], color="C1")
    axes[0].set(ylabel="time switching (s, emulated)", title="switching")
    for key, off, label in (("mean_ttft_ms", -0.2, "mean"), ("p99_ttft_ms", 0.2, "p99")):
        axes[1].bar([i + off for i in range(len(runs))], [r[key] for r in runs], width=0.4, label=label)
    axes[1].set_xticks(range(len(runs)), names)
    axes[1].set(ylabel="TTFT (ms, emulated)", title="time to first token", yscale="log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path)
